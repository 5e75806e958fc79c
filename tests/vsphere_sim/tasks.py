"""Simulated Tasks: TaskInfo as a client polls it, run now or on a thread, and the body of
CloneVM_Task (a full copy of a VM or of one of its snapshots, with its placement).

Failures inside tasks are reported through ``task.info.error`` as vSphere does, not as SOAP
faults.
"""

from __future__ import annotations

import shutil
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from pyVmomi import vim, vmodl

from .datastores import sparse_copy
from .objects import DATASTORES, DS, MAX_NAME, VM_FOLDER, escaped_length, now
from .vms import Vm


class Tasks:
    """The tasks' part of the Inventory (see inventory.py)."""

    def _init_tasks(self) -> None:
        self.tasks: dict[str, vim.TaskInfo] = {}
        self.clone_delay = 0.0
        self.task_reads: dict[str, int] = {}  # test control: how often each task was polled
        # Test control, not a behaviour seen on vSphere: False makes a clone whose
        # config.deviceChange removes disks answer NotSupported, so that the driver's
        # fallback to a clone of every disk (for a vCenter that would refuse) is exercised.
        self.clone_removes_disks = True
        # When a clone is registered (listed by FindChild, in its folder's childEntity):
        # "start" (as soon as its task starts: the worst case for a retried take) or "end"
        # (when its copy is done, as the vSphere Client shows a new VM; not documented).
        self.clone_listed = "start"
        # Test control: this many next clone tasks fail half-way, as when vpxd restarts or
        # the host fails: the task ends in SystemError, the clone is not registered, and
        # its datastore folder stays with what was copied (an orphan).
        self.interrupt_clones = 0
        # govmomi's reading of a clone whose config.deviceChange removes disks: every
        # source disk is copied into the clone's folder, and the removal only detaches the
        # device (simulator/virtual_machine.go, CloneVMTask). Off: a removed disk is not
        # copied at all. Whether vCenter copies it is not documented.
        self.clone_copies_removed_disks = False
        # govmomi's reading of a clone's placement: CloneVMTask reads spec.location's
        # datastore only, never its disk locators (simulator/virtual_machine.go, 0.24.2),
        # so every disk goes to the clone's home. On: this simulator does the same.
        self.ignore_disk_locators = False
        # Test control: the next CloneVM_Task is refused for a missing privilege (at the
        # call, as vCenter checks permissions: NoPermission, whose privilegeId names it,
        # vSphere API reference) or fails for space (in its task: NoDiskSpace, "This fault
        # is thrown when an operation fails because of insufficient disk space").
        self.clone_fault: str | None = None

    def run_task(
        self, entity: Any, description_id: str, work: Callable[[], Any], delay: float = 0.0
    ) -> vim.Task:
        """Create a Task; run ``work`` now, or after ``delay`` seconds on a thread.

        A delayed task reports ``info.progress`` (TaskInfo.progress, "Task progress in
        percent", vSphere API reference) rising with the time spent, as a long clone does."""
        moid = self.new_moid("task")
        task = vim.Task(moid)
        info = vim.TaskInfo(
            key=moid,
            task=task,
            descriptionId=description_id,
            entity=entity,
            entityName=self.properties(entity).get("name") if entity is not None else None,
            state="running",
            cancelled=False,
            cancelable=False,
            reason=vim.TaskReasonUser(userName=self.user),
            queueTime=now(),
            startTime=now(),
            eventChainId=next(self._ids),
        )
        self.tasks[moid] = info

        def finish() -> None:
            if delay:
                info.progress = 0
                started = time.monotonic()
                while (spent := time.monotonic() - started) < delay:
                    with self.lock:
                        info.progress = min(99, int(100 * spent / delay))
                    time.sleep(min(0.1, delay - spent))
            with self.lock:
                try:
                    info.result = work()
                    info.state = "success"
                    if delay:
                        info.progress = 100
                except vmodl.MethodFault as exc:
                    info.error, info.state = exc, "error"
                except Exception as exc:  # a simulator bug: fail the task, never hang it
                    traceback.print_exc()
                    info.error, info.state = vmodl.RuntimeFault(msg=f"simulator: {exc!r}"), "error"
                info.completeTime = now()

        if delay:
            threading.Thread(target=finish, daemon=True).start()
        else:
            finish()
        return task

    def begin_clone(
        self, src: Vm, name: str, spec: vim.vm.CloneSpec, folder: str
    ) -> Callable[[], vim.VirtualMachine]:
        """Start a full copy of the bytes at ``spec.snapshot`` (or now); returns the step
        that copies them. The source is only read.

        The clone is listed (FindByInventoryPath finds it) from the start, with zero disks,
        and its bytes arrive only when the task completes: the worst case for a
        retried take (vCenter lists a clone before its copy is complete).
        A full clone's disks are flat files named after the clone, whatever chain the
        source had (RelocateSpec.diskMoveType moveAllDiskBackingsAndDisallowSharing, the
        default for a clone: "Move all disks, create new disk files"). Linked clones
        (createNewChildDiskBacking, moveChildMostDiskBacking) are not modelled.

        Disks that ``spec.config.deviceChange`` removes are neither copied nor part of the
        clone (see ``_clone_removals``); the kept ones keep their device keys.

        Placement: the clone's home is ``spec.location.datastore``, else the source's home
        datastore ("If not specified, the current datastore is used", RelocateSpec.datastore,
        vSphere API reference); a disk goes where a ``spec.location.disk`` DiskLocator with
        its device key says, else to the clone's home datastore, whatever datastore the
        source disk was on (users see disks from two datastores land on one,
        vmware/pyvmomi-community-samples#593)."""
        self._check_datastore(src.name)
        if self.clone_fault == "NoDiskSpace":
            self.clone_fault = None
            raise vim.fault.NoDiskSpace(
                datastore=DS, msg=f"There is not enough space on datastore {DS}"
            )
        if escaped_length(name) > MAX_NAME:
            raise vim.fault.InvalidName(
                name=name,
                msg="The name is too long. Up to 80 characters may be used (fewer if the"
                " characters %, \\ or / are used)",
            )
        if self.vm_by_name(name):
            raise vim.fault.DuplicateName(name=name, object=VM_FOLDER, msg=f"{name} exists")
        # The clone's folder is named after it; a folder of that name already on the
        # datastore (an earlier clone's orphan) makes vCenter pick <name>_1, <name>_2...
        # (as it numbers a new VM's folder; the orphan is left alone).
        loc = spec.location or vim.vm.RelocateSpec()
        names = {d._moId: n for n, d in DATASTORES.items()}
        home_ds = names.get(loc.datastore._moId, "?") if loc.datastore else src.home_ds
        placed = {d.diskId: names.get(d.datastore._moId, "?") for d in loc.disk or []}
        if self.ignore_disk_locators:
            placed = {}
        if "?" in [home_ds, *placed.values()]:
            raise vim.fault.InvalidDatastore(msg="no such datastore")
        home, n = name, 0
        while (self.ds_dirs[home_ds] / home).exists():
            n += 1
            home = f"{name}_{n}"
        move = loc.diskMoveType
        if move not in (None, "moveAllDiskBackingsAndDisallowSharing"):
            raise vmodl.fault.NotSupported(msg=f"simulator does not model diskMoveType {move}")
        removed = self._clone_removals(src, spec.config)
        kept = [i for i, key in enumerate(src.keys) if key not in removed]
        snap = None
        if spec.snapshot is not None:
            snap = self.resolve(spec.snapshot, vim.vm.Snapshot)
            if snap.vm != src.moid:
                raise vmodl.fault.InvalidArgument(invalidProperty="snapshot")
        vm = Vm(
            self.new_moid("vm"),
            name,
            [src.disks[i] for i in kept],
            folder=folder,
            complete=False,
            keys=[src.keys[i] for i in kept],
            dir=home,
            home_ds=home_ds,
            disk_ds=[placed.get(src.keys[i], home_ds) for i in kept],
        )
        self._write_disks(vm, None)
        if self.clone_listed == "start":
            self.vms[vm.moid] = vm
        interrupted = self.interrupt_clones > 0
        self.interrupt_clones -= interrupted

        def copy() -> vim.VirtualMachine:
            self._check_datastore(src.name)
            frozen = snap if not src.disk_mode.startswith("independent") else None
            sources = [self.disk_file(src, i, frozen) for i in kept]
            snapshot_gone = snap is not None and snap.moid not in self.snaps
            if snapshot_gone or not all(f.exists() for f in sources):
                for path in self.vm_folders(vm):
                    shutil.rmtree(path, ignore_errors=True)
                self.vms.pop(vm.moid, None)
                raise vim.fault.FileNotFound(file=f"[{DS}] {src.name}", msg="source is gone")
            if interrupted:  # half the copy made, then the clone is lost to vCenter
                self.vms.pop(vm.moid, None)
                with open(self.disk_file(vm, 0), "r+b") as f:
                    f.write(self.disk_file(src, kept[0], snap).read_bytes()[: vm.disks[0] // 2])
                raise vmodl.fault.SystemError(reason="vpxd restarted", msg="A general system error")
            for i, source in enumerate(sources):
                vm.copied += sparse_copy(source, self.disk_file(vm, i))
            if self.clone_copies_removed_disks:
                for i, key in enumerate(src.keys):
                    if key in removed:  # copied, then only detached: in no disk of the clone
                        base = f"{name}_detached{key}"
                        target = self.ds_dirs[home_ds] / home / f"{base}-flat.vmdk"
                        vm.copied += sparse_copy(self.disk_file(src, i, snap), target)
                        (target.parent / f"{base}.vmdk").write_text("# Disk DescriptorFile\n")
            vm.complete = True
            self.vms[vm.moid] = vm
            if spec.powerOn:
                vm.power = "poweredOn"
            return vim.VirtualMachine(vm.moid)

        return copy

    def _clone_removals(self, src: Vm, config: vim.vm.ConfigSpec | None) -> set[int]:
        """The device keys of the source disks a clone leaves out.

        VirtualMachineCloneSpec.config is "An optional specification of changes to the
        virtual hardware" of the clone (vSphere API reference, vim.vm.CloneSpec), and a
        VirtualDeviceConfigSpec with operation ``remove`` "Specifies the removal of a
        virtual device" (vim.vm.device.VirtualDeviceSpec.Operation). vCenter's own REST
        clone (vSphere Automation API, VM.CloneSpec.disks_to_remove: "Set of Disks to
        Remove. If unset, all disks will be copied.") shows that a vCenter clone can leave
        disks out; govmomi's simulator applies ``spec.config.deviceChange`` to the clone
        (simulator/virtual_machine.go, CloneVMTask). A removed disk is therefore not
        copied here. A device key the source has no disk for is InvalidDeviceSpec (as
        govmomi's configureDevices answers for an unknown key); any other config change,
        or a removal that also destroys files, is not modelled and answers NotSupported."""
        if config is None:
            return set()
        if config.deviceChange and not self.clone_removes_disks:
            raise vmodl.fault.NotSupported(msg="simulator told to refuse disk removals")
        for prop in type(config)._GetPropertyList():
            if prop.name != "deviceChange" and getattr(config, prop.name) not in (None, []):
                raise vmodl.fault.NotSupported(msg=f"simulator: clone config.{prop.name}")
        removed: set[int] = set()
        for index, change in enumerate(config.deviceChange or []):
            if (
                change.operation != "remove"
                or change.fileOperation
                or not isinstance(change.device, vim.vm.device.VirtualDisk)
            ):
                raise vmodl.fault.NotSupported(
                    msg="simulator: a clone's deviceChange may only remove disks"
                )
            if change.device.key not in src.keys:
                raise vim.fault.InvalidDeviceSpec(
                    deviceIndex=index, msg=f"no device with key {change.device.key}"
                )
            removed.add(change.device.key)
        return removed
