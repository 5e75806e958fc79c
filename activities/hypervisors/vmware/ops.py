"""Finding vSphere objects and running their tasks: what every VMware operation builds on."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from pyVmomi import vim, vmodl
from temporalio import activity

from ...alerts import alert_logger, format_alert
from ...contracts import Alert, AlertSeverity, Consistency, Quiesce
from ...errors import (
    DiskNotFound,
    HypervisorUnavailable,
    InvalidInput,
    QuiesceUnavailable,
    SnapferryError,
    SourceGone,
    UnsupportedImage,
    VmNotFound,
)
from ...settings import Settings
from ..base import HypervisorDriver
from ..quiesce import stopped_vm, without_quiesce
from .common import (
    FLAT_FILE_DATASTORES,
    MOREF_RE,
    TASK_POLL_MAX_S,
    TASK_POLL_S,
    UUID_RE,
    base_backing,
    disk_keys,
    disk_name,
    qualified_disk_name,
    simplest_disk_names,
)
from .session import VsphereSession, fault_error

log = logging.getLogger(__name__)

# What CreateSnapshot_Task answers when VMware Tools could not quiesce the guest (both
# SnapshotFaults, vSphere API reference): ApplicationQuiesceFault, "the (user-supplied)
# custom pre-freeze script in the virtual machine exited with a non-zero return code";
# FilesystemQuiesceFault, the freeze outlasted its time limit, and "we roll back the entire
# snapshot create operation".
QUIESCE_FAULTS = (vim.fault.ApplicationQuiesceFault, vim.fault.FilesystemQuiesceFault)


class VsphereOps(HypervisorDriver):
    """The driver's shared ground: its session, lookups, task polling, snapshot trees."""

    def __init__(self, settings: Settings) -> None:
        if settings.vcenter is None:
            raise InvalidInput("VMware needs SNAPFERRY_VCENTER_URL (and user and password)")
        self.config = settings.vcenter
        self.settings = settings
        self.session = VsphereSession(settings.vcenter)

    # -- lookups ---------------------------------------------------------------------------
    def _find_vm(self, name: str) -> Any:
        """A VM by name, managed object id (``vm-42``) or UUID, in the datacenter.

        ``<dc>/vm/<name>`` first (one call); then a moref id, then an instance UUID (or BIOS
        UUID, ``SearchIndex.FindByUuid``); then the VM folder tree, for VMs in sub-folders.
        A name that several VMs share (vSphere names are unique per folder only) is refused
        with their ids. VMs inside vApps are not searched."""
        dc = self.config.datacenter

        def find(si: Any) -> Any:
            index = si.RetrieveContent().searchIndex
            vm = index.FindByInventoryPath(f"{dc}/vm/{name}")
            if vm is not None:
                return vm
            if MOREF_RE.fullmatch(name):
                candidate = vim.VirtualMachine(name, si._stub)
                try:
                    candidate.name  # noqa: B018 -- does it exist?
                except vmodl.fault.ManagedObjectNotFound:
                    return None
                return candidate
            if UUID_RE.fullmatch(name):
                return index.FindByUuid(None, name, True, True) or index.FindByUuid(
                    None, name, True, False
                )
            root = index.FindByInventoryPath(f"{dc}/vm")
            found = self._search_folders(si, root, name) if root is not None else []
            if len(found) > 1:
                raise InvalidInput(
                    f"{len(found)} VMs are named {name!r} in datacenter {dc!r}"
                    f" ({', '.join(sorted(v._moId for v in found))}): name it by its managed"
                    " object id or instance UUID"
                )
            return found[0] if found else None

        return self.session.call(find, f"finding VM {name!r}")

    @staticmethod
    def _search_folders(si: Any, root: Any, name: str) -> list[Any]:
        """VMs named ``name`` anywhere under the VM folder ``root``: one property read per
        folder for its children, and one for all their names."""
        pc = vmodl.query.PropertyCollector
        found, folders, seen = [], [root], 0
        while folders:
            folder = folders.pop()
            seen += 1
            if seen > 10000:
                raise HypervisorUnavailable("more than 10000 VM folders: giving up the search")
            children = list(folder.childEntity or [])
            folders += [c for c in children if isinstance(c, vim.Folder)]
            vms = [c for c in children if isinstance(c, vim.VirtualMachine)]
            if not vms:
                continue
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=v, skip=False) for v in vms],
                propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=["name"])],
            )
            for content in si.RetrieveContent().propertyCollector.RetrieveContents([spec]):
                if any(p.name == "name" and p.val == name for p in content.propSet):
                    found.append(content.obj)
        return found

    def _find_clone(self, source: Any, name: str) -> Any:
        """The snapshot's clone, which the take puts in its VM's own folder."""
        return self.session.call(
            lambda si: si.RetrieveContent().searchIndex.FindChild(source.parent, name),
            f"finding clone {name!r}",
        )

    def _vm(self, name: str) -> Any:
        vm = self._find_vm(name)
        if vm is None:
            raise VmNotFound(
                f"VM {name!r} does not exist in vCenter datacenter {self.config.datacenter!r}"
            )
        return vm

    def _refuse_standalone_host(self) -> None:
        """A take clones the VM, and a standalone ESXi host has no CloneVM_Task (it answers
        NotSupported): say so before anything is made."""
        about = self.session.call(lambda si: si.RetrieveContent().about, "reading vCenter")
        if about.apiType != "VirtualCenter":
            raise InvalidInput(
                f"{self.config.url} is {about.fullName} (apiType {about.apiType}), not vCenter:"
                " a VMware volume snapshot is a full clone, and only vCenter clones VMs;"
                " point SNAPFERRY_VCENTER_URL at the vCenter that manages this host"
            )

    def _disk_devices(self, vm: Any) -> list[Any]:
        devices = self.session.call(lambda _si: vm.config.hardware.device, "reading disks")
        return [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]

    def _disks(self, vm: Any) -> dict[str, Any]:
        """The VM's disks by name (see ``disk_keys``), also while snapshots stand on them."""
        return disk_keys(self._disk_devices(vm))

    def _check_flat_datastore(self, vm: Any, device: Any, what: str) -> None:
        """Refuse before answering when the disk's datastore holds no ``-flat.vmdk``: the
        backup reads that file over ``/folder``, which answers 404 on vSAN and vVols."""
        backing = base_backing(device.backing)
        ds_name = backing.fileName.partition("] ")[0].lstrip("[")

        def summary(_si: Any) -> Any:
            ds = backing.datastore
            if ds is None:
                ds = next((d for d in vm.datastore if d.name == ds_name), None)
            return ds.summary if ds is not None else None

        info = self.session.call(summary, f"reading datastore {ds_name!r}")
        kind = getattr(info, "type", None)
        if kind not in FLAT_FILE_DATASTORES:
            raise UnsupportedImage(
                f"{what} is on datastore {ds_name!r} of type {kind!r}: snapferry backs up a"
                " VMware disk by reading its -flat.vmdk over the datastore file protocol,"
                " which vSAN and vVols datastores do not have (supported:"
                f" {', '.join(sorted(FLAT_FILE_DATASTORES))}); nothing was taken"
            )

    def _refuse_unreadable_disk(self, vm: Any, device: Any, what: str) -> None:
        """Refuse, before anything is made, a disk whose snapshot a backup could not read
        as the guest's bytes at one point in time:

        - VM Encryption (``config.keyId``, or the backing's ``keyId``): "Data in an
          encrypted virtual disk (VMDK) file is not written in cleartext to storage"
          (vSphere Security); the -flat.vmdk read over ``/folder`` is ciphertext, and a
          clone would need Cryptographer.Clone and carry the key with it.
        - An independent disk (``diskMode`` ``independent_persistent`` or
          ``independent_nonpersistent``): "not affected by snapshots" (VirtualDiskMode,
          vSphere API reference), so the clone would read a disk still being written.
        - A base backing that is not ``VirtualDiskFlatVer2BackingInfo`` (an RDM, a
          SEsparse or other sparse disk): only a flat disk has the raw ``-flat.vmdk``
          extent the backup reads."""
        backing = device.backing
        key = self.session.call(lambda _si: vm.config.keyId, "reading the VM's encryption")
        key = key or getattr(backing, "keyId", None)
        if key is not None:
            raise UnsupportedImage(
                f"{what} is encrypted (VM Encryption, key {key.keyId!r}): its -flat.vmdk"
                " holds ciphertext, which a backup over the datastore file protocol would"
                " copy as it is and a restore could not use; nothing was taken"
            )
        mode = getattr(backing, "diskMode", None) or "persistent"
        if mode.startswith("independent"):
            raise UnsupportedImage(
                f"{what} is in disk mode {mode}: an independent disk is not affected by"
                " snapshots, so no snapshot can freeze it for a backup; make it a dependent"
                " (persistent) disk to snapshot it; nothing was taken"
            )
        base = base_backing(backing)
        if not isinstance(base, vim.vm.device.VirtualDisk.FlatVer2BackingInfo):
            raise UnsupportedImage(
                f"{what} has a {type(base).__name__.rpartition('.')[2]} backing"
                f" ({base.fileName}): snapferry backs up flat disks (FlatVer2) only, whose"
                " -flat.vmdk holds the guest's bytes as they are; nothing was taken"
            )

    def _disk(self, vm: Any, vm_name: str, disk: str) -> Any:
        devices = self._disk_devices(vm)
        disks = disk_keys(devices)
        if disk in disks:
            return disks[disk]
        shared = sorted(qualified_disk_name(d) for d in devices if disk_name(d) == disk)
        if shared:
            raise InvalidInput(
                f"VM {vm_name!r} has {len(shared)} disks named {disk!r}, on different"
                f" datastores: name one of {shared}"
            )
        raise DiskNotFound(
            f"VM {vm_name!r} has no disk {disk!r} (it has {simplest_disk_names(devices)})"
        )

    def _wait(self, task: Any, what: str) -> Any:
        """Poll the task's info (pyVim's WaitForTask needs property-collector filters),
        backing off from 50 ms to 2 s. Inside an activity each poll heartbeats with the
        task's progress, so that a long clone is bounded by liveness, not by wall time, and
        a cancelled attempt (its heartbeat timed out) stops waiting at its next poll."""
        pause, cap = TASK_POLL_S, TASK_POLL_MAX_S
        if activity.in_activity():
            timeout = activity.info().heartbeat_timeout
            if timeout:
                cap = min(cap, timeout.total_seconds() / 4)
        while True:
            info = self.session.call(lambda _si: task.info, what)
            if info.state == vim.TaskInfo.State.success:
                return info.result
            if info.state == vim.TaskInfo.State.error:
                raise fault_error(info.error, what) from info.error
            if activity.in_activity():
                activity.heartbeat({"task": what, "state": info.state, "progress": info.progress})
            time.sleep(pause)
            pause = min(pause * 1.5, cap)

    def _task_info(self, task: Any) -> Any:
        return self.session.call(lambda _si: task.info, "reading a task")

    def _wait_for_tasks(self, vm: Any, vm_name: str) -> None:
        """Wait out every task of ``vm`` still queued or running before a take or discard
        looks at what is there. An earlier attempt's worker may have died while vCenter ran
        its snapshot, its clone or its snapshot removal; those go on without it. A clone is
        listed perhaps only when its copy is done, a snapshot only when it is made: reading
        the tree or the folder meanwhile would start a second snapshot or a second full
        clone. ``ManagedEntity.recentTask``: "The set of recent tasks operating on this
        managed entity" (vSphere API reference)."""
        tasks = self.session.call(lambda _si: list(vm.recentTask or []), "reading tasks")
        for task in tasks:
            try:
                info = self._task_info(task)
            except SourceGone:  # a finished task vCenter has dropped meanwhile
                continue
            if info.state in (vim.TaskInfo.State.queued, vim.TaskInfo.State.running):
                log.info(
                    "waiting for a task on %s still running (%s, %s)",
                    vm_name,
                    info.descriptionId,
                    info.key,
                )
                with contextlib.suppress(SourceGone, HypervisorUnavailable, InvalidInput):
                    self._wait(task, f"a running {info.descriptionId} of {vm_name!r}")

    def _datacenter(self) -> Any:
        dc = self.config.datacenter
        found = self.session.call(
            lambda si: si.RetrieveContent().searchIndex.FindByInventoryPath(dc),
            f"finding datacenter {dc!r}",
        )
        if found is None:
            raise InvalidInput(f"vCenter has no datacenter {dc!r} (SNAPFERRY_VCENTER_DATACENTER)")
        return found

    def _datastore_named(self, entity: Any, name: str) -> Any:
        """The datastore ``name`` among those a VM (or the datacenter) uses, or None."""
        return self.session.call(
            lambda _si: next((d for d in entity.datastore or [] if d.name == name), None),
            f"finding datastore {name!r}",
        )

    def _datastore_names(self, entity: Any) -> list[str]:
        """The names of the datastores a VM (or the datacenter) uses."""
        return self.session.call(
            lambda _si: sorted({d.name for d in entity.datastore or []}), "reading datastores"
        )

    def _delete_datastore_path(self, ds: str, path: str, what: str) -> bool:
        """``FileManager.DeleteDatastoreFile_Task`` of ``[ds] path``: "Deletes the specified
        file or folder from the datastore [...] Folder deletes are always recursive"
        (vSphere API reference). False if it was not there (FileNotFound)."""
        name = f"[{ds}] {path}"
        dc = self._datacenter()
        try:
            task = self.session.call(
                lambda si: si.RetrieveContent().fileManager.DeleteDatastoreFile_Task(
                    name=name, datacenter=dc
                ),
                f"deleting {name} ({what})",
            )
            self._wait(task, f"deleting {name} ({what})")
        except SourceGone as exc:
            if isinstance(exc.__cause__, vim.fault.FileNotFound):
                return False
            raise
        log.info("deleted %s (%s)", name, what)
        return True

    def _vm_by_moref(self, moref: str, name: str) -> Any:
        """The VM ``moref``, if it still exists and is still called ``name``: morefs stay
        stable while a VM is registered (moves between folders keep them), but one freed by
        a VM's removal could in principle be reused, so the name is checked too."""

        def get(si: Any) -> Any:
            vm = vim.VirtualMachine(moref, si._stub)
            try:
                return vm if vm.name == name else None
            except vmodl.fault.ManagedObjectNotFound:
                return None

        return self.session.call(get, f"finding VM {moref} ({name!r})")

    def _find_anywhere(self, name: str) -> Any:
        """A VM by exact name anywhere under the datacenter's VM folder (one property read
        per folder): for a clone whose source VM moved or is gone."""
        dc = self.config.datacenter

        def find(si: Any) -> Any:
            root = si.RetrieveContent().searchIndex.FindByInventoryPath(f"{dc}/vm")
            found = self._search_folders(si, root, name) if root is not None else []
            return found[0] if found else None

        return self.session.call(find, f"finding VM {name!r}")

    def _run(self, start: Callable[[], Any], what: str) -> Any:
        return self._wait(self.session.call(lambda _si: start(), what), what)

    def _snapshots(self, vm: Any) -> Iterator[Any]:
        info = self.session.call(lambda _si: vm.snapshot, "reading snapshots")
        stack = list(info.rootSnapshotList) if info else []
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.childSnapshotList or [])

    def _snapshot_named(self, vm: Any, name: str) -> Any | None:
        return next((n.snapshot for n in self._snapshots(vm) if n.name == name), None)

    def _remove_snapshot(self, vm: Any, vm_name: str, snap: Any, what: str) -> None:
        """Remove one vSphere snapshot; its children stay (re-parented), as do the disks.
        Then the VM's disks are consolidated if the removal left redo logs behind."""
        self._run(lambda: snap.RemoveSnapshot_Task(removeChildren=False), what)
        self._settle_consolidation(vm, vm_name, what)

    def _needs_consolidation(self, vm: Any) -> bool:
        needed = self.session.call(
            lambda _si: vm.runtime.consolidationNeeded, "reading runtime.consolidationNeeded"
        )
        return bool(needed)

    def _settle_consolidation(self, vm: Any, vm_name: str, what: str) -> bool:
        """Consolidate the VM's disks if vSphere says they need it; True if they do not
        (any more). A snapshot removal merges its redo log only "if possible"
        (RemoveSnapshot_Task's ``consolidate``, vSphere API reference): under a lock (a
        backup proxy's hot-add, for one) the snapshot leaves the tree while the VM keeps
        running on its delta, which grows and is never merged, and
        ``runtime.consolidationNeeded`` turns true. ``ConsolidateVMDisks_Task`` merges it.
        If that fails too, an alert (``VMWARE.CONSOLIDATION.NEEDED``) names the VM, and
        the operation that removed the snapshot is not failed for it: what it made (a
        clone, a removed VM snapshot) is complete."""
        if not self._needs_consolidation(vm):
            return True
        error = "consolidationNeeded is still set"
        try:
            self._run(vm.ConsolidateVMDisks_Task, f"consolidating the disks of {vm_name!r}")
            if not self._needs_consolidation(vm):
                log.info("consolidated the disks of %s after %s", vm_name, what)
                return True
        except SnapferryError as exc:
            error = str(exc)
        alert = Alert(
            event="VMWARE.CONSOLIDATION.NEEDED",
            severity=AlertSeverity.WARNING,
            vm=vm_name,
            message=f"the disks of VM {vm_name!r} need consolidation after {what}, and"
            f" ConsolidateVMDisks_Task did not do it ({error}): the VM runs on a redo log"
            " that keeps growing; consolidate it in vCenter (Snapshots > Consolidate)",
        )
        log.warning(format_alert(alert))
        logger = alert_logger(self.settings)
        logger.warning(format_alert(alert))
        for handler in logger.handlers:
            handler.flush()
        return False

    # -- snapshots, quiesced or not --------------------------------------------------------
    def _tools_missing(self, vm: Any) -> str | None:
        """Why VMware Tools cannot quiesce ``vm``'s guest now, or None while they run
        (GuestInfo.toolsRunningStatus ``guestToolsRunning``; the older toolsStatus tells a
        guest that never had them, ``toolsNotInstalled``)."""
        guest = self.session.call(lambda _si: vm.guest, "reading VMware Tools status")
        running = getattr(guest, "toolsRunningStatus", None)
        if running == "guestToolsRunning":
            return None
        if getattr(guest, "toolsStatus", None) == "toolsNotInstalled":
            return "VMware Tools is not installed in the guest"
        return f"VMware Tools is not running in the guest (toolsRunningStatus {running or 'unset'})"

    def _snapshot_node(self, vm: Any, name: str) -> Any | None:
        return next((n for n in self._snapshots(vm) if n.name == name), None)

    def _take_snapshot(
        self,
        vm: Any,
        vm_name: str,
        *,
        name: str,
        description: str,
        memory: bool,
        quiesce: Quiesce,
        running: bool,
        what: str,
    ) -> tuple[Any, Consistency, str | None]:
        """The vSphere snapshot ``name`` (an earlier attempt's if it is there), and how
        consistent it is.

        CreateSnapshot_Task's ``quiesce``: "If TRUE and the virtual machine is powered on
        when the snapshot is taken, VMware Tools is used to quiesce the file system in the
        virtual machine. [...] If the virtual machine is powered off or VMware Tools are
        not available, the quiesce flag is ignored" (vSphere API reference): vSphere takes
        a crash-consistent snapshot then and says so only in the tree's ``quiesced``. So
        Tools are asked about first (not running: ``without_quiesce``, a refusal for yes
        before anything is taken), a quiesce fault (QUIESCE_FAULTS, rolled back by
        vSphere) is a refusal for yes and a snapshot without quiesce for try, and the
        snapshot's ``quiesced`` is read after: false (Tools stopped meanwhile) removes the
        snapshot and refuses yes, and notes try. A stopped VM has nothing in flight
        (``stopped_vm``)."""

        def create(quiesced: bool) -> Any:
            return self._run(
                lambda: vm.CreateSnapshot_Task(
                    name=name, description=description, memory=memory, quiesce=quiesced
                ),
                what,
            )

        node = self._snapshot_node(vm, name)
        if not running or quiesce == Quiesce.NO:
            consistency, note = stopped_vm(quiesce) if not running else (Consistency.CRASH, None)
            return (node.snapshot if node else create(False)), consistency, note
        if node is None:
            missing = self._tools_missing(vm)
            if missing is not None:
                consistency, note = without_quiesce(quiesce, missing)
                return create(False), consistency, note
            try:
                create(True)
            except SnapferryError as exc:
                fault = exc.__cause__
                if not isinstance(fault, QUIESCE_FAULTS):
                    raise
                reason = (
                    f"VMware Tools could not quiesce the guest ({type(fault).__name__}:"
                    f" {getattr(fault, 'msg', None) or exc})"
                )
                # vSphere rolls a failed quiesced snapshot back; a host that left it
                # anyway must not leave it to this take's refusal or retry.
                half = self._snapshot_node(vm, name)
                if half is not None:
                    self._remove_snapshot(vm, vm_name, half.snapshot, f"removing {name!r}")
                consistency, note = without_quiesce(quiesce, reason)
                return create(False), consistency, note
            node = self._snapshot_node(vm, name)
            if node is None:
                raise HypervisorUnavailable(f"{what}: snapshot {name!r} is not in the tree")
        if node.quiesced:
            return node.snapshot, Consistency.APPLICATION, None
        reason = (
            f"snapshot {name!r} is not quiesced (VMware Tools did not answer, and vSphere"
            " ignores the quiesce flag then; or an earlier attempt fell back without it)"
        )
        if quiesce == Quiesce.YES:
            self._remove_snapshot(vm, vm_name, node.snapshot, f"removing {name!r}")
            raise QuiesceUnavailable(
                f"cannot quiesce: {reason}; it was removed, nothing was kept (take it with"
                " --quiesce=try to fall back to a crash-consistent snapshot, or without"
                " --quiesce)"
            )
        return node.snapshot, Consistency.CRASH, f"crash-consistent: {reason}"

    def _powered_on(self, vm: Any) -> bool:
        state = self.session.call(lambda _si: vm.runtime.powerState, "reading power state")
        return bool(state == "poweredOn")

    def _destroy(self, vm: Any, what: str) -> None:
        if self._powered_on(vm):
            self._run(vm.PowerOffVM_Task, f"powering off {what}")
        self._run(vm.Destroy_Task, f"destroying {what}")
