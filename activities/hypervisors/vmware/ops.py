"""Finding vSphere objects and running their tasks: what every VMware operation builds on."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from pyVmomi import vim, vmodl
from temporalio import activity

from ...errors import (
    DiskNotFound,
    HypervisorUnavailable,
    InvalidInput,
    SourceGone,
    UnsupportedImage,
    VmNotFound,
)
from ...settings import Settings
from ..base import HypervisorDriver
from .common import (
    FLAT_FILE_DATASTORES,
    MOREF_RE,
    TASK_POLL_MAX_S,
    TASK_POLL_S,
    UUID_RE,
    base_backing,
    disk_name,
)
from .session import VsphereSession, fault_error

log = logging.getLogger(__name__)


class VsphereOps(HypervisorDriver):
    """The driver's shared ground: its session, lookups, task polling, snapshot trees."""

    def __init__(self, settings: Settings) -> None:
        if settings.vcenter is None:
            raise InvalidInput("VMware needs SNAPFERRY_VCENTER_URL (and user and password)")
        self.config = settings.vcenter
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

    def _disks(self, vm: Any) -> dict[str, Any]:
        """The VM's disks by base name (``web01``), also while snapshots stand on them."""
        devices = self.session.call(lambda _si: vm.config.hardware.device, "reading disks")
        return {disk_name(d): d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)}

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

    def _disk(self, vm: Any, vm_name: str, disk: str) -> Any:
        disks = self._disks(vm)
        if disk not in disks:
            raise DiskNotFound(f"VM {vm_name!r} has no disk {disk!r} (it has {sorted(disks)})")
        return disks[disk]

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

    def _wait_for_clones(self, vm: Any, vm_name: str) -> None:
        """Wait out any clone of ``vm`` still running: a retried take can find its clone
        listed before the copy is complete (the first attempt's task goes on in vCenter
        after that attempt was given up), and must not take it for finished."""
        tasks = self.session.call(lambda _si: list(vm.recentTask or []), "reading tasks")
        for task in tasks:
            info = self._task_info(task)
            running = info.state in (vim.TaskInfo.State.queued, vim.TaskInfo.State.running)
            if info.descriptionId == "VirtualMachine.clone" and running:
                log.info("waiting for a clone of %s that is still running (%s)", vm_name, info.key)
                with contextlib.suppress(SourceGone, HypervisorUnavailable, InvalidInput):
                    self._wait(task, f"a running clone of {vm_name!r}")

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

    def _remove_snapshot(self, snap: Any, what: str) -> None:
        """Remove one vSphere snapshot; its children stay (re-parented), as do the disks."""
        self._run(lambda: snap.RemoveSnapshot_Task(removeChildren=False), what)

    def _powered_on(self, vm: Any) -> bool:
        state = self.session.call(lambda _si: vm.runtime.powerState, "reading power state")
        return bool(state == "poweredOn")

    def _destroy(self, vm: Any, what: str) -> None:
        if self._powered_on(vm):
            self._run(vm.PowerOffVM_Task, f"powering off {what}")
        self._run(vm.Destroy_Task, f"destroying {what}")
