"""VHD chains as SM keeps them on a VHD SR: base copies, ``sm_config['vhd-parent']``, the
chain-depth limit, and the garbage collector's coalesce (xapi-project/sm at 471cf7ed71).

- A snapshot (or clone) freezes the source's leaf VHD as a new read-only parent with a
  uuid of its own, introduced as a VDI labelled ``base copy`` with ``managed = false``
  (``FileSR._snapshot`` l.857-868, ``set_managed(base_vdi_ref, False)`` l.878; LVHDSR
  alike); the source keeps its uuid on a new empty leaf. Every VDI's ``sm_config`` names
  its parent's uuid as ``vhd-parent`` (l.845, 868, 882; ``FileVDI.load`` l.488/539).
- ``FileSR._snapshot`` l.772-777 (``LVHDSR`` l.1674-1679): a VDI whose chain is
  ``vhdutil.MAX_CHAIN_SIZE`` (30, ``vhdutil.py`` l.30) VHDs deep or more is refused with
  ``SnapshotChainTooLong``, code 109 (``XE_SR_ERRORCODES.xml`` l.469-471), which XAPI
  answers as ``SR_BACKEND_FAILURE_109`` (``xapi_vm_snapshot.ml`` l.674 matches it). The
  depth counts the VDI's own VHD and every parent (blktap ``vhd_chain_depth``: a lone VHD
  is 1).
- ``cleanup.py`` (the GC): a hidden VHD with children whose parent has no other child is
  coalesceable (``isCoalesceable`` l.636-642); it is coalesced into that parent and its
  children relinked to it (``_coalesce`` l.2001, ``_relinkSkip`` l.926-935; ``vhd-parent``
  rewritten by ``_setParent`` l.1003). A hidden VHD with no child is garbage and goes.
  Leaf-coalesce (a leaf into its only-child parent, l.644-650) is not modelled: "some SRs
  do not coalesce the leaf" (Xen Orchestra ``@xen-orchestra/xapi/vm.mjs`` l.149). Here
  the GC runs at once after every ``VDI.destroy`` (SM kicks it then, in the background)
  unless it is stalled (``POST /sim/gc``), as when an LVHD SR is too full to coalesce.
"""

from __future__ import annotations

from .model import VDI, Layer, Store, XapiError, new_ref, new_uuid

MAX_CHAIN_SIZE = 30  # SM libs/sm/vhdutil.py l.30


def check_depth(vdi: VDI) -> None:
    """``_snapshot``'s refusal of a chain already at the limit (VHD VDIs only)."""
    if vdi.image_format == "vhd" and len(vdi.chain) >= MAX_CHAIN_SIZE:
        raise XapiError("SR_BACKEND_FAILURE_109", "", "The snapshot chain is too long", "")


def freeze_leaf(vdi: VDI) -> None:
    """The leaf about to become a shared parent gets the uuid of its base-copy VDI."""
    leaf = vdi.chain[0]
    if not leaf.ref:
        leaf.ref, leaf.uuid, leaf.sr, leaf.size = new_ref(), new_uuid(), vdi.sr, vdi.size


def parent_uuid(chain: list[Layer], index: int) -> str | None:
    """``vhd-parent`` of the VHD at ``chain[index]`` (None for the chain's root)."""
    return chain[index + 1].uuid if index + 1 < len(chain) else None


def base_copies(store: Store) -> dict[str, tuple[Layer, list[Layer], int]]:
    """Every hidden parent VHD (a layer below some VDI's leaf) by its VDI ref: the layer,
    one chain holding it and its index there (the rest of the chain is the same in every
    chain that holds it)."""
    found: dict[str, tuple[Layer, list[Layer], int]] = {}
    for vdi in store.vdis.values():
        if vdi.image_format != "vhd":
            continue
        for i, layer in enumerate(vdi.chain[1:], start=1):
            if layer.ref and layer.ref not in found:
                found[layer.ref] = (layer, vdi.chain, i)
    return found


def coalesce(store: Store) -> int:
    """One GC run (unless stalled): coalesce every coalesceable base copy into its parent
    until none is left; returns how many went."""
    if store.gc_stalled:
        return 0
    done = 0
    while (pick := _coalesceable(store)) is not None:
        child, parent = pick
        parent.blocks |= child.blocks  # vhd-util coalesce: the child's data into the parent
        for vdi in store.vdis.values():
            if any(layer is child for layer in vdi.chain):
                vdi.chain = [layer for layer in vdi.chain if layer is not child]
        done += 1
    return done


def _coalesceable(store: Store) -> tuple[Layer, Layer] | None:
    children: dict[int, set[int]] = {}
    for vdi in store.vdis.values():
        for child, parent in zip(vdi.chain, vdi.chain[1:], strict=False):
            children.setdefault(id(parent), set()).add(id(child))
    for vdi in store.vdis.values():
        if vdi.image_format != "vhd":
            continue
        for i in range(1, len(vdi.chain) - 1):  # hidden, with a parent
            child, parent = vdi.chain[i], vdi.chain[i + 1]
            if children.get(id(parent)) == {id(child)} and children.get(id(child)):
                return child, parent
    return None
