"""VM snapshots: every disk at one point (and the guest's RAM for DiskAndMemory), taken as
one external snapshot, reverted through revert layers, released on delete like volume
snapshots' overlays."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from ...contracts import Quiesce, VmSnapshotOperation, VmSnapshotTaken, VmSnapshotType
from ...errors import InvalidInput, VmNotFound
from ...storage.reader import ImageLayer
from .common import VM_SUFFIX, chain_paths, libvirt_error, marked, memory_path, overlay_path
from .quiesce import thaw_if_frozen
from .release import ReleaseOps
from .revert import RevertLayer, RevertOps
from .take import TakeOps, retried_consistency


def _with_disk_sources(definition: str, sources: dict[str, str]) -> str:
    """A domain definition whose named disks read from the given qcow2 files (a revert's
    new layers), with no recorded ``<backingStore>`` (libvirt re-detects the chain)."""
    root = ET.fromstring(definition)
    for el in root.findall("./devices/disk"):
        target = el.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in sources:
            continue
        src, drv = el.find("source"), el.find("driver")
        if src is not None:
            src.set("file", sources[dev])
        if drv is not None:
            drv.set("type", "qcow2")
        for backing in el.findall("backingStore"):
            el.remove(backing)
    return ET.tostring(root, encoding="unicode")


class VmSnapshotOps(TakeOps, ReleaseOps, RevertOps):
    """VM snapshots, made of the same layers and merges as volume snapshots."""

    def take_vm_snapshot(self, op: VmSnapshotOperation) -> VmSnapshotTaken:
        """An external snapshot of every disk at once (plus RAM for DiskAndMemory).

        The overlays are never merged while the VM snapshot exists: it holds them unreleased,
        like a volume snapshot whose backup has not finished, so every later volume-snapshot
        merge stops above its frozen images."""
        vm = op.vm.name
        with self._locked_domain(vm) as dom:
            self._refuse_managed_save(dom, vm, "a VM snapshot")
            running = bool(dom.isActive())
            with_memory = op.type == VmSnapshotType.DISK_AND_MEMORY
            actives = self._file_disks(dom, vm)
            overlays = {
                d: overlay_path(a, op.snapshot_id, vm_snapshot=True) for d, a in actives.items()
            }
            older = {d: overlay_path(a, op.snapshot_id) for d, a in actives.items()}
            if any(marked(o, VM_SUFFIX) for o in older.values()):
                overlays = older  # a retry of a take an older version started
            first = next(iter(actives.values()))
            memory = memory_path(first, op.snapshot_id) if with_memory else None
            present = [d for d in actives if overlays[d] in chain_paths(self._chain(dom, vm, d))]
            if not present:  # a retry finds what its first (atomic) attempt made
                if with_memory and not running:
                    raise InvalidInput(
                        f"VM {vm!r} is stopped: a DiskAndMemory snapshot needs a running VM"
                        " (take a Disk snapshot instead)"
                    )
                consistency, note = self._create_consistent(
                    dom, vm, overlays, memory, op.quiesce, running=running
                )
            else:
                consistency, note = retried_consistency(op.quiesce, running=running)
                if op.quiesce != Quiesce.NO and running:
                    thaw_if_frozen(dom)
            for overlay in overlays.values():
                Path(overlay + VM_SUFFIX).touch()  # no backup reads through it
            return VmSnapshotTaken(
                overlays=overlays,
                memory=memory,
                vm_was_running=running,
                consistency=consistency,
                consistency_note=note,
            )

    def revert_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        """Every disk back to the VM snapshot; with memory, the VM resumes from it, running.

        A Disk snapshot needs the VM stopped (the guest would see its disks change under
        it). A DiskAndMemory revert replaces the running state by definition, so a running
        VM is powered off, then restored from the saved memory with its disks on the
        reverted images (never on the frozen images the save file names).

        Every layer that can fail to build (a full copy needs primary space) is built and
        verified first, while the VM still runs; only then is it powered off, the layers
        swapped in and the guest restored. A transient domain (what CloudStack's agent
        runs) vanishes from libvirt when powered off, so its definition is taken before,
        and the restore brings it back with the new disks."""
        assert op.taken is not None
        vm = op.vm.name
        with self._locked_domain(vm) as dom:
            if op.taken.memory and not Path(op.taken.memory).exists():
                raise InvalidInput(f"VM snapshot {op.snapshot_id}: its memory file is gone")
            running = bool(dom.isActive())
            if running and op.taken.memory is None:
                raise InvalidInput(
                    f"VM {vm!r} is running; stop it before reverting to Disk snapshot"
                    f" {op.snapshot_id}"
                )
            self._refuse_managed_save(dom, vm, "a revert")
            persistent = bool(dom.isPersistent())
            sources = {d: self._frozen_below(dom, vm, d, o) for d, o in op.taken.overlays.items()}
            built: dict[str, RevertLayer] = {}
            try:
                for disk, frozen in sources.items():
                    built[disk] = self._build_revert_layer(
                        dom, vm, disk, op.snapshot_id, source=frozen.path, source_fmt=frozen.format
                    )
                if running:
                    dom.destroy()
                swapped = {
                    disk: self._swap_in_revert_layer(dom, vm, disk, layer, define=persistent)
                    for disk, layer in built.items()
                }
            except libvirt.libvirtError as exc:
                raise libvirt_error(exc, vm=vm) from exc
            finally:
                for layer in built.values():
                    Path(layer.partial).unlink(missing_ok=True)
            if op.taken.memory is not None:
                try:
                    # The image's own definition, with the reverted disks: libvirt checks
                    # a restore's XML for ABI stability against the one in the image
                    # (qemuSaveImageUpdateDef), which an inactive or live definition (an
                    # expanded CPU, say) can fail; a transient domain has no other left.
                    definition = self._connection().saveImageGetXMLDesc(
                        op.taken.memory, libvirt.VIR_DOMAIN_XML_SECURE
                    )
                    self._connection().restoreFlags(
                        op.taken.memory,
                        _with_disk_sources(definition, swapped),
                        libvirt.VIR_DOMAIN_SAVE_RUNNING,
                    )
                except libvirt.libvirtError as exc:
                    raise libvirt_error(exc, vm=vm) from exc

    def delete_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        """Release the VM snapshot's overlays (merging what that allows) and its memory."""
        vm = op.vm.name
        if op.taken is None:
            return
        for overlay in op.taken.overlays.values():
            self._mark_released(overlay)
        try:
            with self._locked_domain(vm) as dom:
                for disk in op.taken.overlays:
                    self._consolidate(dom, vm, disk)
        except VmNotFound:
            # The domain is gone; its disk files may not be (undefine keeps them, and they
            # can be defined again): the layers stay, marked, for a later release to merge.
            pass
        if op.taken.memory:
            Path(op.taken.memory).unlink(missing_ok=True)

    def _frozen_below(self, dom: libvirt.virDomain, vm: str, disk: str, overlay: str) -> ImageLayer:
        """The image a snapshot froze: whatever its overlay is backed by now."""
        layers = self._chain(dom, vm, disk)
        chain = chain_paths(layers)
        if overlay not in chain or overlay == chain[-1]:
            raise InvalidInput(
                f"VM {vm!r} disk {disk!r}: the snapshot's layer {Path(overlay).name} is no"
                " longer in the disk's chain"
            )
        return layers[chain.index(overlay) + 1]
