"""The take (a full clone of one disk from a temporary snapshot), the backup's source, and
the release and discard of the clone."""

from __future__ import annotations

import logging
from typing import Any

from pyVmomi import vim, vmodl

from ...contracts import (
    BackupPlan,
    Consistency,
    DiscardRequest,
    PrimarySnapshot,
    Quiesce,
    VolumeRef,
)
from ...errors import HypervisorUnavailable, UnsupportedImage
from ..quiesce import stopped_vm
from .cbt import CbtOps
from .common import (
    VM_SNAPSHOT_PREFIX,
    VOLUME_SNAPSHOT_PREFIX,
    base_backing,
    capacity,
    clone_name,
    disk_datastore,
    flat_path,
    vm_lock,
)
from .reader import DatastoreReader

log = logging.getLogger(__name__)


class TakeOps(CbtOps):
    """Volume snapshots: take, backup source, release, discard."""

    # -- take --------------------------------------------------------------------------------
    def take(
        self, *, volume: VolumeRef, snapshot_id: str, quiesce: Quiesce = Quiesce.NO
    ) -> PrimarySnapshot:
        """A full clone of the disk from a temporary vSphere snapshot, quiesced when asked
        (``_take_snapshot``). With Changed Block Tracking on before the take (see
        ``cbt``), the disk's changeId at the snapshot is recorded and the snapshot stays
        until release, for the backup's ``QueryChangedDiskAreas`` (the changed areas for a
        delta, the allocated ones for a full). Otherwise it goes as soon as the clone is
        made, and CBT is turned on where it can be, for the next take."""
        typed, disk = volume.vm.name, volume.disk
        with vm_lock(typed):
            self._refuse_standalone_host()
            vm = self._vm(typed)
            vm_name = self.session.call(lambda _si: vm.name, "reading the VM's name")
            source_disk = self._disk(vm, typed, disk)
            self._refuse_unreadable_disk(vm, source_disk, f"disk {disk!r} of VM {typed!r}")
            self._check_flat_datastore(vm, source_disk, f"disk {disk!r} of VM {typed!r}")
            running = self._powered_on(vm)
            name = clone_name(vm_name, snapshot_id)
            snap_name = VOLUME_SNAPSHOT_PREFIX + snapshot_id
            # An earlier attempt's snapshot, clone or removal may still be running in
            # vCenter after its worker died: wait for them before deciding what to make.
            self._wait_for_tasks(vm, typed)
            tracked = self._tracking_on(vm, f"VM {typed!r}")
            clone = self._find_clone(vm, name)  # a retried take finds its clone
            if clone is None:
                snap, consistency, note = self._take_snapshot(
                    vm,
                    vm_name,
                    name=snap_name,
                    description=f"snapferry volume snapshot {snapshot_id} (temporary)",
                    memory=False,
                    quiesce=quiesce,
                    running=running,
                    what=f"snapshotting VM {typed!r}",
                )
                self._remove_orphans(vm, name, f"an interrupted clone for {snapshot_id}")
                parent = self.session.call(lambda _si: vm.parent, "reading the VM folder")
                devices = self.session.call(lambda _si: vm.config.hardware.device, "reading disks")
                others = [
                    d
                    for d in devices
                    if isinstance(d, vim.vm.device.VirtualDisk) and d.key != source_disk.key
                ]
                clone = self._clone(
                    vm, parent, name, snap, others, source_disk, f"{typed!r}", snapshot_id
                )
            else:
                consistency, note = self._retried_consistency(vm, snap_name, quiesce, running)
            leftover = self._snapshot_named(vm, snap_name)
            # With CBT on before this take, the disk's changeId at the snapshot (for the next
            # backup's delta), and the snapshot itself stays for this backup's
            # QueryChangedDiskAreas (the changed areas for a delta, the allocated ones for a
            # full). A retried take reads the same changeId from it; one whose snapshot is
            # gone answers none, as the first attempt did.
            change_id = None
            if tracked and leftover is not None:
                change_id = self._change_id_at(leftover, source_disk.key)
            if leftover is not None and change_id is None:
                # The clone holds the bytes now; the VM goes free.
                self._remove_snapshot(
                    vm, vm_name, leftover, f"removing temporary snapshot of {typed!r}"
                )
            cloned = {d.key: d for d in self._disk_devices(clone)}
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
            # Where the clone's disk really went (a vCenter that ignored the locator): the
            # backup reads its -flat.vmdk, so the same datastore check as the source's.
            self._check_flat_datastore(clone, target, f"the clone {name!r} of disk {disk!r}")
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
                handle=clone._moId,
                change_id=change_id,
                consistency=consistency,
                consistency_note=note,
            )

    def _retried_consistency(
        self, vm: Any, snap_name: str, quiesce: Quiesce, running: bool
    ) -> tuple[Consistency, str | None]:
        """The consistency of the clone an earlier attempt made: its snapshot's ``quiesced``
        while the snapshot is there. An attempt clones only from a snapshot that passed
        (quiesced for yes), so with the snapshot gone yes is application-consistent and
        try cannot be told: it is recorded crash-consistent, which it may exceed."""
        if not running:
            return stopped_vm(quiesce)
        if quiesce == Quiesce.NO:
            return Consistency.CRASH, None
        node = self._snapshot_node(vm, snap_name)
        if (node is not None and node.quiesced) or (node is None and quiesce == Quiesce.YES):
            return Consistency.APPLICATION, None
        if node is None:
            return Consistency.CRASH, (
                "crash-consistent as far as is known: a retried take found its clone but not"
                " its snapshot, which told whether VMware Tools quiesced it"
            )
        return Consistency.CRASH, "crash-consistent: the snapshot was taken without quiesce"

    def _remove_orphans(self, vm: Any, name: str, what: str) -> None:
        """Delete the datastore folders ``[ds] <clone name>`` that no registered clone owns:
        what a clone interrupted by a vpxd restart or a host failure leaves (vCenter does
        not register it, and would give the next clone ``<name>_1``). Called only when no
        clone of that name is registered and no task on the VM is still running, on every
        datastore the VM uses (the clone's folder goes to the VM's home datastore). The
        name carries the snapshot's id: the folder is this snapshot's alone."""
        for ds in self._datastore_names(vm):
            self._delete_datastore_path(ds, name, what)

    def _clone(
        self,
        vm: Any,
        folder: Any,
        name: str,
        snap: Any,
        others: list[Any],
        disk: Any,
        what: str,
        sid: str,
    ) -> Any:
        """A full clone of ``vm`` at ``snap`` without the disks in ``others``: the take
        of one volume copies that volume only (CloudStack exported every
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
        the clone of every disk instead, as before: costlier, never wrong.

        The kept disk is pinned to its source's datastore with a ``DiskLocator``: without
        one it would go to the clone's home, the VM's home datastore ("If not specified,
        the current datastore is used", RelocateSpec.datastore; users see the disks of two
        datastores land on one, vmware/pyvmomi-community-samples#593). That home may be a
        vSAN or vVols datastore with no ``-flat.vmdk`` while the disk sits on VMFS, or too
        small for the copy."""
        base = base_backing(disk.backing)
        target = base.datastore or self._datastore_named(vm, disk_datastore(disk))
        locator = [vim.vm.RelocateSpec.DiskLocator(diskId=disk.key, datastore=target)]

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
                location=vim.vm.RelocateSpec(
                    diskMoveType="moveAllDiskBackingsAndDisallowSharing",
                    disk=locator if target is not None else None,
                ),
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
        """The clone's flat disk; for a delta, only the areas Changed Block Tracking says
        changed since the parent's changeId (``SourceGone`` when it cannot say: the backup
        becomes a full); for a full, only the allocated areas where CBT can say which they
        are, else the whole disk (``_allocated_areas``)."""
        ds, _, path = source.image.partition("] ")
        areas: list[tuple[int, int]] | None
        if plan.parent is not None:
            areas = self._changed_areas(source, plan)
        else:
            areas = self._allocated_areas(source)
        return DatastoreReader(self.session, ds.lstrip("["), path, source.virtual_size, areas=areas)

    # -- release / discard -------------------------------------------------------------------
    def release(
        self,
        *,
        volume: VolumeRef,
        snapshot_id: str,
        source: PrimarySnapshot,
        backed_up: bool = True,
    ) -> None:
        """Destroy the clone, then delete its datastore folder (idempotent: a clone and a
        folder already gone are fine). It touches only the clone, a VM of its own, so it
        takes no lock on the source VM and never waits for (or fails on) a take of that VM
        that is still cloning.

        The clone is found by the moref the record keeps, so a source VM moved to another
        folder (or renamed) does not hide it; records without one are searched by name.
        ``Destroy_Task`` deletes the VM's own files only: a disk file the clone does not use
        (one it removed at clone time, if vCenter copied it before detaching it) stays, with
        the folder (CloudStack's worker VMs left "the clone VM folder with volume VMDK
        inside", apache/cloudstack#5333). The folder is snapferry's alone (named after the
        snapshot), so it goes as a whole."""
        name = source.overlay or clone_name(volume.vm.name, snapshot_id)
        if source.change_id is not None:
            self._remove_kept_snapshot(volume.vm.name, snapshot_id)
        clone = self._vm_by_moref(source.handle, name) if source.handle else None
        if clone is None:
            clone = self._clone_by_name(volume.vm.name, name)
        folders = {self._image_folder(source.image)}
        if clone is not None:
            folders.add(self._home_folder(clone))
            self._destroy(clone, f"clone of snapshot {snapshot_id}")
        for ds, folder in sorted(f for f in folders if f is not None):
            if folder == name or folder.startswith(f"{name}_"):
                self._delete_datastore_path(ds, folder, f"the clone of snapshot {snapshot_id}")

    def _remove_kept_snapshot(self, vm_name: str, snapshot_id: str) -> None:
        """The take's temporary vSphere snapshot, kept for Changed Block Tracking."""
        vm = self._find_vm(vm_name)
        snap = self._snapshot_named(vm, VOLUME_SNAPSHOT_PREFIX + snapshot_id) if vm else None
        if snap is not None:
            name = self.session.call(lambda _si: vm.name, "reading the VM's name")
            self._remove_snapshot(vm, name, snap, f"removing the CBT snapshot of {snapshot_id}")

    @staticmethod
    def _image_folder(image: str) -> tuple[str, str] | None:
        """``[ds1] dir/x-flat.vmdk`` -> (``ds1``, ``dir``)."""
        ds, _, path = image.partition("] ")
        folder = path.rpartition("/")[0]
        return (ds.lstrip("["), folder) if folder and "/" not in folder else None

    def _home_folder(self, vm: Any) -> tuple[str, str] | None:
        """The datastore folder of a VM's configuration (``config.files.vmPathName``)."""
        vmx = self.session.call(lambda _si: vm.config.files.vmPathName, "reading VM files")
        return self._image_folder(vmx or "")

    def _clone_by_name(self, vm_name: str, name: str) -> Any:
        """A clone by name: in its source VM's folder, else anywhere in the datacenter (the
        VM moved, or is gone)."""
        source = self._find_vm(vm_name)
        clone = self._find_clone(source, name) if source is not None else None
        return clone if clone is not None else self._find_anywhere(name)

    def discard(self, req: DiscardRequest) -> None:
        """A failed take may have left its temporary vSphere snapshot, a clone, and the
        folder of an interrupted clone."""
        with vm_lock(req.vm.name):
            vm = self._find_vm(req.vm.name)
            vm_name = req.vm.name
            if vm is not None:
                vm_name = self.session.call(lambda _si: vm.name, "reading the VM's name")
                self._wait_for_tasks(vm, req.vm.name)  # a clone still copying holds both
                for prefix in (VOLUME_SNAPSHOT_PREFIX, VM_SNAPSHOT_PREFIX):
                    snap = self._snapshot_named(vm, prefix + req.snapshot_id)
                    if snap is not None:
                        self._remove_snapshot(
                            vm, vm_name, snap, f"removing what take {req.snapshot_id} left"
                        )
            name = clone_name(vm_name, req.snapshot_id)
            clone = self._clone_by_name(req.vm.name, name)
            if clone is not None:
                self._destroy(clone, f"clone of failed snapshot {req.snapshot_id}")
            where = vm if vm is not None else self._datacenter()
            for ds in self._datastore_names(where):
                self._delete_datastore_path(ds, name, f"what take {req.snapshot_id} left")
