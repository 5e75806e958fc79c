"""The take (a full clone of one disk from a temporary snapshot), the backup's source, and
the release and discard of the clone."""

from __future__ import annotations

import logging
from typing import Any

from pyVmomi import vim, vmodl

from ...contracts import BackupPlan, DiscardRequest, PrimarySnapshot, VolumeRef
from ...errors import HypervisorUnavailable, UnsupportedImage
from .common import (
    VM_SNAPSHOT_PREFIX,
    VOLUME_SNAPSHOT_PREFIX,
    capacity,
    clone_name,
    flat_path,
    vm_lock,
)
from .ops import VsphereOps
from .reader import DatastoreReader

log = logging.getLogger(__name__)


class TakeOps(VsphereOps):
    """Volume snapshots: take, backup source, release, discard."""

    # -- take --------------------------------------------------------------------------------
    def take(self, *, volume: VolumeRef, snapshot_id: str) -> PrimarySnapshot:
        vm_name, disk = volume.vm.name, volume.disk
        with vm_lock(vm_name):
            self._refuse_standalone_host()
            vm = self._vm(vm_name)
            source_disk = self._disk(vm, vm_name, disk)
            self._check_flat_datastore(vm, source_disk, f"disk {disk!r} of VM {vm_name!r}")
            running = self._powered_on(vm)
            name = clone_name(vm_name, snapshot_id)
            snap_name = VOLUME_SNAPSHOT_PREFIX + snapshot_id
            clone = self._find_clone(vm, name)  # a retried take finds its clone
            if clone is not None:  # perhaps still being copied by the first attempt's task
                self._wait_for_clones(vm, vm_name)
                clone = self._find_clone(vm, name)  # gone again if that clone failed
            if clone is None:
                snap = self._snapshot_named(vm, snap_name) or self._run(
                    lambda: vm.CreateSnapshot_Task(
                        name=snap_name,
                        description=f"snapferry volume snapshot {snapshot_id} (temporary)",
                        memory=False,
                        quiesce=False,
                    ),
                    f"snapshotting VM {vm_name!r}",
                )
                parent = self.session.call(lambda _si: vm.parent, "reading the VM folder")
                devices = self.session.call(lambda _si: vm.config.hardware.device, "reading disks")
                others = [
                    d
                    for d in devices
                    if isinstance(d, vim.vm.device.VirtualDisk) and d.key != source_disk.key
                ]
                clone = self._clone(vm, parent, name, snap, others, f"{vm_name!r}", snapshot_id)
            leftover = self._snapshot_named(vm, snap_name)
            if leftover is not None:  # the clone holds the bytes now; the VM goes free
                self._remove_snapshot(leftover, f"removing temporary snapshot of {vm_name!r}")
            cloned = {d.key: d for d in self._disks(clone).values()}
            if len(cloned) > 1:  # a clone made before, or a vCenter that kept them
                log.warning(
                    "clone %s holds %d disks; only %s was asked for (the others were copied too)",
                    name,
                    len(cloned),
                    disk,
                )
            target = cloned.get(source_disk.key)
            if target is None or capacity(target) != capacity(source_disk):
                raise HypervisorUnavailable(
                    f"clone {name!r} has no disk like {disk!r} (key {source_disk.key})"
                )
            if getattr(target.backing, "parent", None) is not None:
                # A full clone (moveAllDiskBackingsAndDisallowSharing) has flat disks; a
                # delta's -flat.vmdk would not hold the guest's bytes.
                raise UnsupportedImage(
                    f"clone {name!r}: disk {target.backing.fileName} is a delta of"
                    f" {target.backing.parent.fileName}, not a flat copy"
                )
            ds, path = flat_path(target.backing.fileName)
            return PrimarySnapshot(
                image=f"[{ds}] {path}",
                image_format="raw",
                overlay=name,
                virtual_size=capacity(source_disk),
                vm_was_running=running,
            )

    def _clone(
        self, vm: Any, folder: Any, name: str, snap: Any, others: list[Any], what: str, sid: str
    ) -> Any:
        """A full clone of ``vm`` at ``snap`` without the disks in ``others``: the take
        of one volume copies that volume only (issue 13, item 5; CloudStack exported every
        disk for a one-volume snapshot, apache/cloudstack#5498, and its fix, #5510, exports
        only the required disk).

        The others go in ``spec.config.deviceChange`` as ``remove`` (no ``fileOperation``:
        the source's files are never touched). VirtualMachineCloneSpec.config is "An
        optional specification of changes to the virtual hardware" of the clone; the
        RelocateSpec's ``deviceChange`` is no alternative, since for a VirtualDisk it
        carries only vFlash and storage-profile settings, and "All other specification
        are ignored" (vSphere API reference, vim.vm.CloneSpec and vim.vm.RelocateSpec).
        vCenter's own REST clone leaves disks out the same way (vSphere Automation API,
        VM.CloneSpec.disks_to_remove: "If unset, all disks will be copied"). A vCenter
        that refuses the removal (InvalidDeviceSpec, NotSupported, InvalidArgument) gets
        the clone of every disk instead, as before: costlier, never wrong."""

        def spec(removing: list[Any]) -> Any:
            config = None
            if removing:
                config = vim.vm.ConfigSpec(
                    deviceChange=[
                        vim.vm.device.VirtualDeviceSpec(operation="remove", device=d)
                        for d in removing
                    ]
                )
            return vim.vm.CloneSpec(
                snapshot=snap,
                location=vim.vm.RelocateSpec(diskMoveType="moveAllDiskBackingsAndDisallowSharing"),
                config=config,
                powerOn=False,
                template=False,
            )

        label = f"full clone of {what} for snapshot {sid}"
        try:
            return self._run(
                lambda: vm.CloneVM_Task(folder=folder, name=name, spec=spec(others)), label
            )
        except HypervisorUnavailable as exc:
            refused = (
                vim.fault.InvalidDeviceSpec,
                vmodl.fault.NotSupported,
                vmodl.fault.InvalidArgument,
            )
            if not others or not isinstance(exc.__cause__, refused):
                raise
            log.warning(
                "vCenter refused a clone of %s without its other %d disks (%s); cloning"
                " every disk instead",
                what,
                len(others),
                exc,
            )
        return self._run(lambda: vm.CloneVM_Task(folder=folder, name=name, spec=spec([])), label)

    # -- backup source ---------------------------------------------------------------------
    def open_reader(self, source: PrimarySnapshot, plan: BackupPlan) -> DatastoreReader:
        ds, _, path = source.image.partition("] ")
        return DatastoreReader(self.session, ds.lstrip("["), path, source.virtual_size)

    # -- release / discard -------------------------------------------------------------------
    def release(
        self,
        *,
        volume: VolumeRef,
        snapshot_id: str,
        source: PrimarySnapshot,
        backed_up: bool = True,
    ) -> None:
        """Destroy the clone (idempotent: a clone already gone is fine). It touches only the
        clone, a VM of its own, so it takes no lock on the source VM and never waits for
        (or fails on) a take of that VM that is still cloning."""
        clone = self._clone_of(volume.vm.name, snapshot_id)
        if clone is not None:
            self._destroy(clone, f"clone of snapshot {snapshot_id}")

    def _clone_of(self, vm_name: str, snapshot_id: str, source: Any = None) -> Any:
        """A snapshot's clone: in its source VM's folder, or anywhere if that VM is gone."""
        source = source or self._find_vm(vm_name)
        name = clone_name(vm_name, snapshot_id)
        return self._find_clone(source, name) if source is not None else self._find_vm(name)

    def discard(self, req: DiscardRequest) -> None:
        """A failed take may have left its temporary vSphere snapshot and a clone."""
        with vm_lock(req.vm.name):
            vm = self._find_vm(req.vm.name)
            if vm is not None:
                self._wait_for_clones(vm, req.vm.name)  # a clone still copying holds both
                for prefix in (VOLUME_SNAPSHOT_PREFIX, VM_SNAPSHOT_PREFIX):
                    snap = self._snapshot_named(vm, prefix + req.snapshot_id)
                    if snap is not None:
                        self._remove_snapshot(snap, f"removing what take {req.snapshot_id} left")
            clone = self._clone_of(req.vm.name, req.snapshot_id, vm)
            if clone is not None:
                self._destroy(clone, f"clone of failed snapshot {req.snapshot_id}")
