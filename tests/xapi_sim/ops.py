"""State-changing operations (VM/VDI lifecycle), shared by XML-RPC and ``/sim`` control.

Every function takes the store lock itself, so the bytes of a snapshot are taken at
one instant with respect to guest writes and imports.
"""

from __future__ import annotations

from typing import Any

from .chains import check_depth, coalesce, freeze_leaf
from .disks import copy_sparse_to, create_sparse, write_at
from .model import (
    BLOCK,
    NULL_REF,
    SR,
    VBD,
    VDI,
    VM,
    Layer,
    Store,
    XapiError,
    new_ref,
    new_uuid,
    xapi_time,
)


def _int(value: object, what: str) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise XapiError("FIELD_TYPE_ERROR", what) from None


def new_vdi(
    store: Store,
    name: str,
    size: int,
    *,
    copy_of: VDI | None = None,
    snapshot_of: str = "",
    sr: SR | None = None,
    share_chain: bool = False,
) -> VDI:
    """A VDI backed by ``<root>/<sr-uuid>/<vdi-uuid>.raw``; zeros or a copy of ``copy_of``.

    ``share_chain`` (VDI.snapshot/clone on a VHD SR): ``copy_of``'s leaf becomes a shared
    read-only parent and both VDIs get a new empty leaf. Otherwise a copy is one flat VHD
    allocating what the source's chain allocates (VDI.copy)."""
    size = -(-size // 512) * 512  # VHD-based SRs only hold whole sectors
    sr = sr or (store.srs[copy_of.sr] if copy_of is not None else store.sr)
    vdi_uuid = new_uuid()
    vdi = VDI(new_ref(), vdi_uuid, name, size, sr.ref, sr.path / f"{vdi_uuid}.raw")
    if copy_of is not None:
        copy_sparse_to(copy_of.path, vdi.path, size)
        if share_chain:
            # VDI.snapshot/clone (xapi_vdi.ml snapshot_and_clone, l.836-851): the new VDI
            # gets the source's name_label (the caller passes it), name_description, type
            # and other_config.
            vdi.name_description, vdi.type = copy_of.name_description, copy_of.type
            vdi.image_format = copy_of.image_format  # the SR makes its snapshots alike
            vdi.other_config = dict(copy_of.other_config)
            check_depth(copy_of)  # SM FileSR._snapshot l.772-777 (chains.py)
            freeze_leaf(copy_of)
            frozen = list(copy_of.chain)
            copy_of.chain = [Layer(), *frozen]
            vdi.chain = [Layer(), *frozen]
        else:
            vdi.chain = [Layer(blocks=copy_of.allocated())]
    else:
        create_sparse(vdi.path, size)
    if snapshot_of:
        vdi.is_a_snapshot, vdi.snapshot_of, vdi.snapshot_time = True, snapshot_of, xapi_time()
    store.vdis[vdi.ref] = vdi
    return vdi


def allocate(vdi: VDI, offset: int, length: int) -> None:
    """A write through tapdisk allocates every block it touches in the leaf VHD."""
    if length > 0:
        vdi.chain[0].blocks.update(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))


def running_vm_of(store: Store, vdi: VDI) -> VM | None:
    """The Running VM this VDI is plugged into (a VBD is attached iff its VM runs)."""
    for vbd in store.vbds.values():
        vm = store.vms.get(vbd.vm)
        if vbd.vdi == vdi.ref and vm is not None and vm.power_state == "Running":
            return vm
    return None


def add_vbd(store: Store, vm: VM, vdi: VDI, userdevice: int, device: str = "") -> VBD:
    """A VBD; its ``device`` is "" unless the VM runs (then it is plugged and named) or a
    snapshot/revert copies a VBD record with its device (xapi_vm_clone.ml copies it)."""
    vbd = VBD(new_ref(), new_uuid(), vm.ref, vdi.ref, userdevice, device)
    if vm.power_state == "Running":  # attached to a running VM: the device is known
        vbd.boot()
    store.vbds[vbd.ref] = vbd
    vm.vbds.append(vbd.ref)
    return vbd


def create_vm(
    store: Store,
    name: str,
    disks: list[int],
    power: str,
    *,
    template: bool = False,
    allow_duplicate: bool = False,
    host: int = 1,
    memory: int = 256 << 20,
    shared: bool = False,
) -> VM:
    """A VM (or a template: Halted, ``is_a_template``) with zero-filled disks.

    XAPI allows any number of VMs with one label; here a second live VM of a name is
    refused unless ``allow_duplicate``, so that a test names its VMs on purpose."""
    if power not in ("Running", "Halted"):
        raise ValueError("power must be Running or Halted")
    if template and power != "Halted":
        raise ValueError("a template is Halted (XAPI never starts one)")
    with store.lock:
        taken = any(v.name_label == name and store.live_vm(v) for v in store.vms.values())
        if taken and not template and not allow_duplicate:
            raise ValueError(f"a VM named {name!r} already exists")
        vm = VM(new_ref(), new_uuid(), name, power, is_a_template=template, memory=memory)
        store.vms[vm.ref] = vm
        sr = store.shared_sr if shared else store.sr2 if host == 2 else store.sr
        for i, size in enumerate(disks):
            add_vbd(store, vm, new_vdi(store, f"{name} disk {i}", int(size), sr=sr), i)
        return vm


def guest_write(store: Store, vm: VM, disk: int, offset: int, data: bytes) -> None:
    with store.lock:
        vbds = sorted((store.vbds[r] for r in vm.vbds), key=lambda b: b.userdevice)
        vdi = store.vdis[vbds[disk].vdi]
        if offset < 0 or offset + len(data) > vdi.size:
            raise ValueError("write beyond the end of the disk")
        write_at(vdi.path, offset, data)
        allocate(vdi, offset, len(data))


# ----- VDI -------------------------------------------------------------------------


def vdi_record_at_start(store: Store, ref: str) -> dict[str, str]:
    """What ``snapshot_and_clone`` reads of the source before the SM call (xapi_vdi.ml
    l.817, ``Db.VDI.get_record``) and copies onto the snapshot after it (l.836-851): the
    snapshot carries the source's other_config as it was when the call *began*."""
    with store.lock:
        src = store.get("VDI", ref)
        return {"name_label": src.name_label, **{f"oc:{k}": v for k, v in src.other_config.items()}}


def vdi_snapshot(
    store: Store, ref: str, driver_params: object = None, *, at_start: dict[str, str] | None = None
) -> str:
    with store.lock:
        src = store.get("VDI", ref)
        snap = new_vdi(
            store, src.name_label, src.size, copy_of=src, snapshot_of=src.ref, share_chain=True
        )
        if at_start is not None:
            snap.name_label = at_start["name_label"]
            snap.other_config = {k[3:]: v for k, v in at_start.items() if k.startswith("oc:")}
        return snap.ref


def vdi_clone(store: Store, ref: str) -> str:
    with store.lock:
        src = store.get("VDI", ref)
        return new_vdi(store, src.name_label, src.size, copy_of=src, share_chain=True).ref


def vdi_copy(store: Store, ref: str, sr: str) -> str:
    with store.lock:
        src = store.get("VDI", ref)
        target = store.get("SR", sr)
        return new_vdi(store, src.name_label, src.size, copy_of=src, sr=target).ref


def vdi_create(store: Store, record: dict[str, Any]) -> str:
    if not isinstance(record, dict):
        raise XapiError("FIELD_TYPE_ERROR", "record")
    for key in ("SR", "virtual_size"):
        if key not in record:
            raise XapiError("FIELD_TYPE_ERROR", key)
    with store.lock:
        store.get("SR", record["SR"])
        size = _int(record["virtual_size"], "virtual_size")
        if size <= 0:
            raise XapiError("FIELD_TYPE_ERROR", "virtual_size")
        vdi = new_vdi(
            store,
            str(record.get("name_label", "")),
            vhd_size(size),
            sr=store.get("SR", record["SR"]),
        )
        vdi.name_description = str(record.get("name_description", ""))
        vdi.other_config = dict(record.get("other_config") or {})
        return vdi.ref


MIN_VHD_SIZE = 2 << 20  # SM libs/sm/vhdutil.py l.27
MAX_VHD_SIZE = 2040 << 30  # l.28


def vhd_size(size: int) -> int:
    """The size SM gives a VHD VDI (``vhdutil.validate_and_round_vhd_size``, l.409-424,
    called by ``FileSR.create`` l.564 and ``FileVDI.resize`` l.659, and LVHDSR alike):
    at least 2 MiB, rounded up to a whole 2 MiB block. ``VDI.virtual_size`` then says
    the rounded size (``update_vdi_db`` from the SM's answer)."""
    if size < 0 or size > MAX_VHD_SIZE:
        raise XapiError("SR_BACKEND_FAILURE_79", "", "VDI Invalid size", "")
    return -(-max(size, MIN_VHD_SIZE) // BLOCK) * BLOCK


def vdi_resize(store: Store, ref: str, size_text: object) -> None:
    """``VDI.resize`` (xapi_vdi.ml l.1049-1067 -> SM ``FileVDI.resize``, l.639-674): not
    while a running VM has it plugged (resize is no live operation, xapi_vdi.ml
    ``operation_can_be_performed_live`` l.223-235: ``VDI_IN_USE``); a smaller size is
    ``VDISize`` (SR_BACKEND_FAILURE_79, "shrinking not allowed"); the new size is rounded
    as at create. The new tail reads as zeros and is allocated nowhere."""
    with store.lock:
        vdi = store.get("VDI", ref)
        size = _int(size_text, "size")
        if running_vm_of(store, vdi) is not None:
            raise XapiError("VDI_IN_USE", vdi.ref, "resize")
        if size < vdi.size:
            raise XapiError(
                "SR_BACKEND_FAILURE_79", "", "VDI Invalid size [opterr=shrinking not allowed]", ""
            )
        if size == vdi.size:
            return
        vdi.size = vhd_size(size)
        with open(vdi.path, "r+b") as f:
            f.truncate(vdi.size)


def vdi_destroy(store: Store, ref: str) -> None:
    with store.lock:
        vdi = store.get("VDI", ref)
        if running_vm_of(store, vdi) is not None:
            raise XapiError("VDI_IN_USE", vdi.ref, "destroy")
        for vbd in [b for b in store.vbds.values() if b.vdi == vdi.ref]:
            store.vms[vbd.vm].vbds.remove(vbd.ref)
            del store.vbds[vbd.ref]
        del store.vdis[vdi.ref]
        vdi.path.unlink(missing_ok=True)
        # xapi_vdi.ml destroy_and_data_destroy_common l.1011-1027: the VDI's VBDs (none
        # attached: VDI_IN_USE above) are destroyed with it, and a VM whose suspend_VDI
        # it was gets the null ref.
        for vm in store.vms.values():
            if vm.suspend_vdi == vdi.ref:
                vm.suspend_vdi = NULL_REF
        coalesce(store)  # SM kicks its GC after a delete (chains.py)


# ----- VBD -------------------------------------------------------------------------


def vbd_create(store: Store, record: dict[str, Any]) -> str:
    if not isinstance(record, dict) or "VM" not in record or "VDI" not in record:
        raise XapiError("FIELD_TYPE_ERROR", "VM/VDI")
    with store.lock:
        vm, vdi = store.get("VM", record["VM"]), store.get("VDI", record["VDI"])
        used = {store.vbds[r].userdevice for r in vm.vbds}
        raw = str(record.get("userdevice", "autodetect"))
        dev = min(set(range(16)) - used) if raw == "autodetect" else _int(raw, "userdevice")
        if dev in used:
            raise XapiError("DEVICE_ALREADY_EXISTS", dev)
        return add_vbd(store, vm, vdi, dev).ref


def vbd_destroy(store: Store, ref: str) -> None:
    with store.lock:
        vbd = store.get("VBD", ref)
        if store.vms[vbd.vm].power_state == "Running":
            raise XapiError("OPERATION_NOT_ALLOWED", "VBD is currently attached")
        store.vms[vbd.vm].vbds.remove(vbd.ref)
        del store.vbds[vbd.ref]


# ----- VM --------------------------------------------------------------------------


_SNAPSHOT_OPS = ("revert", "clone", "copy", "export", "destroy", "hard_shutdown")


def _refuse_non_vm(vm: VM, op: str) -> None:
    """What xapi_vm_lifecycle.ml (``check_operation_error``) answers after the power-state
    check: a template (not a snapshot) allows no power or snapshot op (``check_template``:
    ``VM_IS_TEMPLATE [vm, op]``), a snapshot allows only revert/clone/copy/export/destroy/
    hard_shutdown (``check_snapshot``: ``VM_IS_SNAPSHOT [vm, op]``), and a control domain
    refuses the rest with ``OPERATION_NOT_ALLOWED``. ``op`` is the name record_util.ml
    gives the operation (``start``, ``snapshot``, ...)."""
    if vm.is_a_template and not vm.is_a_snapshot:
        raise XapiError("VM_IS_TEMPLATE", vm.ref, op)
    if vm.is_a_snapshot and op not in _SNAPSHOT_OPS:
        raise XapiError("VM_IS_SNAPSHOT", vm.ref, op)
    if vm.is_control_domain:
        raise XapiError(
            "OPERATION_NOT_ALLOWED", "This operation is not allowed on a control domain"
        )


def refuse_blocked(vm: VM, op: str) -> None:
    """xapi_vm_lifecycle.ml ``check_operation_error`` l.495-502, the first check of every
    VM operation, before its power state: an operation in ``blocked_operations`` is
    ``OPERATION_BLOCKED [vm, the entry's value]``."""
    if op in vm.blocked_operations:
        raise XapiError("OPERATION_BLOCKED", vm.ref, vm.blocked_operations[op])


def add_blocked(store: Store, ref: str, op: str, value: str) -> None:
    """``VM.add_to_blocked_operations`` (xapi_vm.ml l.1667 -> the database's map add): a
    key already there is ``MAP_DUPLICATE_KEY [VM, blocked_operations, ref, key]``
    (db_cache_impl.ml l.375, exnHelper.ml l.47)."""
    with store.lock:
        vm = store.get("VM", ref)
        if op in vm.blocked_operations:
            raise XapiError("MAP_DUPLICATE_KEY", "VM", "blocked_operations", vm.ref, op)
        vm.blocked_operations[str(op)] = str(value)


def vm_snapshot(
    store: Store,
    ref: str,
    new_name: str,
    ignore_vdis: list[str] | None = None,
    *,
    memory: bool = False,
) -> str:
    with store.lock:
        vm = store.get("VM", ref)
        refuse_blocked(vm, "checkpoint" if memory else "snapshot")
        if memory and "Checkpoint" in store.restricted:
            # xapi_vm.ml checkpoint l.786: Pool_features.assert_enabled Features.Checkpoint
            # -> LICENCE_RESTRICTION [feature name] (pool_features.ml l.33-37)
            raise XapiError("LICENCE_RESTRICTION", "Checkpoint")
        if memory and vm.power_state != "Running":
            raise XapiError("VM_BAD_POWER_STATE", vm.ref, "running", vm.power_state.lower())
        _refuse_non_vm(vm, "checkpoint" if memory else "snapshot")
        for vbd in (store.vbds[r] for r in vm.vbds):
            # Every disk's VDI.snapshot checks its chain (SM FileSR._snapshot l.772-777);
            # checked up front here so that a refusal leaves no half-made snapshot.
            if vbd.vdi not in (ignore_vdis or []):
                check_depth(store.vdis[vbd.vdi])
        # xapi_vm_clone.ml (copy_vm_record): the snapshot VM's name_label is exactly the
        # new_name the caller passed (nothing added: "xe vm-snapshot new-name-label=web01"
        # gives a second "web01"), is_a_template = is_a_snapshot = true, snapshot_of = vm.
        snap = VM(new_ref(), new_uuid(), str(new_name), "Halted", is_a_snapshot=True)
        snap.is_a_template, snap.is_control_domain = True, vm.is_control_domain
        snap.snapshot_of, snap.snapshot_time = vm.ref, xapi_time()
        snap.snapshot_info = {"power-state-at-snapshot": vm.power_state}
        if memory:
            # A checkpoint carries the VM's memory image in its suspend_VDI, a VDI of the
            # VM's memory size on the SR (xapi_vm_snapshot.ml, checkpoint: the VM is
            # suspended to a new VDI, which becomes the snapshot's suspend_VDI). VM.destroy
            # of the snapshot leaves it, as every VDI (CloudStack's
            # CitrixDeleteVMSnapshotCommandWrapper destroys it explicitly).
            snap.power_state = "Suspended"
            image = new_vdi(store, f"Suspend image of {vm.name_label}", vm.memory)
            image.type = "suspend"
            allocate(image, 0, image.size)
            snap.suspend_vdi = image.ref
        store.vms[snap.ref] = snap
        for vbd in sorted((store.vbds[r] for r in vm.vbds), key=lambda b: b.userdevice):
            if vbd.vdi in (ignore_vdis or []):
                continue
            copy = store.vdis[vdi_snapshot(store, vbd.vdi)]
            add_vbd(store, snap, copy, vbd.userdevice, vbd.device)
        vm.parent = snap.ref
        return snap.ref


def vm_revert(store: Store, ref: str) -> None:
    """Disks take the snapshot's bytes; power state becomes the snapshot's.

    ``in-place`` mode keeps the VM's VDI refs (the brief's model). ``xapi`` mode
    does what XAPI does: destroys the VM's snapshotted VDIs, clones the snapshot
    disks into new VDIs, re-points ``snapshot_of`` and leaves a checkpoint revert
    Suspended (call ``VM.resume``).
    """
    with store.lock:
        snap = store.get("VM", ref)
        # xapi_vm_lifecycle.ml: a template that is no snapshot refuses revert
        # (check_template), any other non-snapshot answers REVERT_ONLY_ALLOWED_ON_SNAPSHOT.
        if snap.is_a_template and not snap.is_a_snapshot:
            raise XapiError("VM_IS_TEMPLATE", snap.ref, "revert")
        if not snap.is_a_snapshot:
            raise XapiError("REVERT_ONLY_ALLOWED_ON_SNAPSHOT")
        if snap.snapshot_of not in store.vms:  # XAPI re-creates the VM: not modelled
            raise XapiError("VM_REVERT_FAILED", snap.ref, snap.snapshot_of)
        vm = store.vms[snap.snapshot_of]
        for snap_vbd in (store.vbds[r] for r in snap.vbds):
            # the revert clones each snapshot disk (xapi_vm_snapshot.ml, VDI.clone ->
            # SM _snapshot l.772-777): a chain at the limit fails the revert (l.674)
            check_depth(store.vdis[snap_vbd.vdi])
        if vm.power_state != "Halted":
            # message_forwarding.ml (VM.revert, l.2462-2471): "first of all, destroy the
            # domain if needed": a VM that is not Halted is hard-shut down by XAPI itself
            # (Client.VM.hard_shutdown) before Xapi_vm_snapshot.revert_vm_fields runs.
            vm.power_state = "Halted"
            if vm.suspend_vdi in store.vdis:  # xapi_vm.ml hard_shutdown, l.376-385
                vdi_destroy(store, vm.suspend_vdi)
            vm.suspend_vdi = NULL_REF
        mine = {store.vbds[r].userdevice: store.vbds[r] for r in vm.vbds}
        for snap_vbd in (store.vbds[r] for r in snap.vbds):
            src = store.vdis[snap_vbd.vdi]
            target = mine.get(snap_vbd.userdevice)
            if store.revert_mode == "xapi":
                _revert_by_clone(store, vm, src, target, snap_vbd)
            elif target is not None:
                dst = store.vdis[target.vdi]
                copy_sparse_to(src.path, dst.path, src.size)
                dst.chain[0].blocks |= src.allocated() | dst.allocated()
        if snap.power_state == "Suspended":  # a checkpoint
            if store.revert_mode == "xapi":
                # revert_vbds clones the snapshot's suspend_VDI into the VM's.
                vm.power_state = "Suspended"
                image = store.vdis.get(snap.suspend_vdi)
                if image is not None:
                    clone = new_vdi(store, image.name_label, image.size, copy_of=image)
                    clone.type = "suspend"
                    vm.suspend_vdi = clone.ref
            else:
                vm.power_state = "Running"
        else:
            vm.power_state = "Halted"
        vm.parent = snap.ref
        coalesce(store)  # the VM's old VDIs were destroyed


def _revert_by_clone(store: Store, vm: VM, src: VDI, target: VBD | None, snap_vbd: VBD) -> None:
    if target is not None:
        old = store.vdis[target.vdi]
        vm.vbds.remove(target.ref)
        del store.vbds[target.ref]
        if src.snapshot_of == old.ref:
            del store.vdis[old.ref]
            old.path.unlink(missing_ok=True)
    clone = new_vdi(store, src.name_label, src.size, copy_of=src, share_chain=True)
    tree = src.snapshot_of  # every snapshot of the old disk now hangs off the clone
    for other in store.vdis.values():
        if tree != NULL_REF and other.snapshot_of == tree:
            other.snapshot_of = clone.ref
    add_vbd(store, vm, clone, snap_vbd.userdevice, snap_vbd.device)


def vm_destroy(store: Store, ref: str) -> None:
    """Removes the VM and its VBDs only; VDIs stay until ``VDI.destroy`` (as in XAPI)."""
    with store.lock:
        vm = store.get("VM", ref)
        if vm.power_state == "Running":
            raise XapiError("VM_BAD_POWER_STATE", vm.ref, "halted", "running")
        for r in vm.vbds:
            del store.vbds[r]
        del store.vms[vm.ref]


def vm_set_power(store: Store, ref: str, expected: str, new: str, op: str) -> None:
    with store.lock:
        vm = store.get("VM", ref)
        refuse_blocked(vm, op)  # before the power state (xapi_vm_lifecycle.ml l.495-510)
        if vm.power_state != expected:  # then the power state
            raise XapiError("VM_BAD_POWER_STATE", vm.ref, expected.lower(), vm.power_state.lower())
        _refuse_non_vm(vm, op)
        vm.power_state = new
        if new == "Running":
            for r in vm.vbds:  # plugged: xenopsd names the device
                store.vbds[r].boot()
        if op in ("resume", "resume_on") and vm.suspend_vdi in store.vdis:
            # xapi_xenops.ml resume: the suspend image is destroyed once the VM runs.
            vdi_destroy(store, vm.suspend_vdi)
            vm.suspend_vdi = NULL_REF
