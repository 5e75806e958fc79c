"""The simulated vCenter inventory: one datacenter, one datastore, VMs with real disk bytes.

Disk bytes live as files under ``<root>/ds1`` so tests can compare them directly.
Snapshots are *full copies* of each disk taken at snapshot time (vSphere writes
redo logs instead; the observable bytes are the same). Failures inside tasks are
reported through ``task.info.error`` as vSphere does, not as SOAP faults.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyVmomi import vim, vmodl
from pyVmomi.VmomiSupport import ManagedObject

DC, DS = "dc1", "ds1"
SI = vim.ServiceInstance("ServiceInstance")
ROOT_FOLDER = vim.Folder("group-d1")
DATACENTER = vim.Datacenter("datacenter-2")
VM_FOLDER = vim.Folder("group-v3")
DATASTORE = vim.Datastore("datastore-11")
PROPERTY_COLLECTOR = vmodl.query.PropertyCollector("propertyCollector")
SESSION_MANAGER = vim.SessionManager("SessionManager")
SEARCH_INDEX = vim.SearchIndex("SearchIndex")
_FIXED = {m._moId: m for m in (SI, ROOT_FOLDER, DATACENTER, VM_FOLDER, DATASTORE)}
_FIXED |= {m._moId: m for m in (PROPERTY_COLLECTOR, SESSION_MANAGER, SEARCH_INDEX)}


def now() -> datetime:
    return datetime.now(UTC)


def disk_base(vm: str, index: int) -> str:
    """vSphere's naming: first disk ``<vm>``, later disks ``<vm>_<n>``."""
    return vm if index == 0 else f"{vm}_{index}"


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy only the allocated extents (SEEK_DATA/SEEK_HOLE) so big zero disks stay cheap."""
    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fd, pos = fin.fileno(), 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            fin.seek(start)
            fout.seek(start)
            while start < end:
                chunk = fin.read(min(1 << 20, end - start))
                fout.write(chunk)
                start += len(chunk)
            pos = end
        fout.truncate(size)


@dataclass
class Snap:
    """A snapshot: its place in the tree and whether it captured a running VM (memory)."""

    moid: str
    vm: str
    id: int
    name: str
    description: str
    created: datetime
    memory: bool
    quiesced: bool
    parent: str | None = None
    children: list[str] = field(default_factory=list)


@dataclass
class Vm:
    """A VM: its disks are files named after it; ``current`` is the current snapshot."""

    moid: str
    name: str
    disks: list[int]  # capacity in bytes per disk
    power: str = "poweredOff"
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    current: str | None = None
    next_snap_id: int = 1


class Inventory:
    """All state and vSphere operations; callers hold ``lock`` around every call."""

    def __init__(self, root: Path, user: str) -> None:
        self.ds_dir = root / DS
        self.ds_dir.mkdir(parents=True, exist_ok=True)
        self.ds_dir = self.ds_dir.resolve()
        self.user = user
        self.lock = threading.RLock()
        self.vms: dict[str, Vm] = {}
        self.snaps: dict[str, Snap] = {}
        self.tasks: dict[str, vim.TaskInfo] = {}
        self.datastore_gone = False
        self.clone_delay = 0.0
        self._ids = itertools.count(100)

    # ----- files -------------------------------------------------------------------

    def disk_file(self, vm: Vm, index: int, snap: Snap | None = None) -> Path:
        base = disk_base(vm.name, index)
        suffix = f"-snap{snap.id}" if snap else ""
        return self.ds_dir / vm.name / f"{base}{suffix}-flat.vmdk"

    def _check_datastore(self, what: str) -> None:
        if self.datastore_gone:
            raise vim.fault.FileNotFound(file=f"[{DS}] {what}", msg=f"datastore {DS} is gone")

    def _write_disks(self, vm: Vm, sources: list[Path] | None) -> None:
        """Create a VM's flat files (copies of ``sources`` or zero-filled) and descriptors."""
        (self.ds_dir / vm.name).mkdir(parents=True, exist_ok=False)
        for i, size in enumerate(vm.disks):
            flat = self.disk_file(vm, i)
            if sources:
                sparse_copy(sources[i], flat)
            else:
                with open(flat, "wb") as f:
                    f.truncate(size)
            base = disk_base(vm.name, i)
            (flat.parent / f"{base}.vmdk").write_text(
                '# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\nCID=fffffffe\n'
                'parentCID=ffffffff\ncreateType="vmfs"\n\n# Extent description\n'
                f'RW {size // 512} VMFS "{base}-flat.vmdk"\n\n# The Disk Data Base\n#DDB\n\n'
                'ddb.adapterType = "lsilogic"\nddb.virtualHWVersion = "19"\n'
            )

    # ----- lookup ------------------------------------------------------------------

    def new_moid(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def vm_by_name(self, name: str) -> Vm | None:
        return next((v for v in self.vms.values() if v.name == name), None)

    def resolve(self, mo: Any, kind: type = ManagedObject) -> Any:
        """Return the record behind a moref, or raise ManagedObjectNotFound like vSphere.

        The moref's type must match too: ``Folder:vm-5`` is as unknown as ``vm-999``.
        """
        moid: str = getattr(mo, "_moId", "")
        for table, typ in (
            (self.vms, vim.VirtualMachine),
            (self.snaps, vim.vm.Snapshot),
            (self.tasks, vim.Task),
            (_FIXED, type(_FIXED.get(moid))),
        ):
            if moid in table and isinstance(mo, typ) and isinstance(mo, kind):
                return table[moid]
        raise vmodl.fault.ManagedObjectNotFound(obj=mo, msg=f"object {moid} not found")

    def create_vm(self, name: str, disks: list[int], power: str) -> Vm:
        """Test-control entry point: a new VM with zero-filled disks."""
        if self.vm_by_name(name) or any(s % 512 for s in disks):
            raise ValueError("duplicate name or disk size not a multiple of 512")
        vm = Vm(self.new_moid("vm"), name, list(disks), power)
        self._write_disks(vm, None)
        self.vms[vm.moid] = vm
        return vm

    def guest_write(self, vm: Vm, disk: int, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > vm.disks[disk]:
            raise ValueError("write outside the disk")
        with open(self.disk_file(vm, disk), "r+b") as f:
            f.seek(offset)
            f.write(data)

    # ----- properties ----------------------------------------------------------------

    def properties(
        self, mo: Any, api_version: str = "", session: vim.UserSession | None = None
    ) -> dict[str, Any]:
        """Every *modelled* property of an object; unset ones map to None."""
        rec = self.resolve(mo)
        if isinstance(rec, Vm):
            props = self._vm_props(rec)
        elif isinstance(rec, Snap):
            props = {
                "vm": vim.VirtualMachine(rec.vm),
                "childSnapshot": vim.vm.Snapshot.Array([vim.vm.Snapshot(c) for c in rec.children]),
            }
        elif isinstance(rec, vim.TaskInfo):
            props = {"info": rec}
        elif rec is SI:
            props = {"content": self.service_content(api_version)}
        elif rec is ROOT_FOLDER:
            props = {"name": "Datacenters", "childEntity": vim.ManagedEntity.Array([DATACENTER])}
        elif rec is DATACENTER:
            props = {"name": DC, "parent": ROOT_FOLDER, "vmFolder": VM_FOLDER}
            props["datastore"] = vim.Datastore.Array([DATASTORE])
        elif rec is VM_FOLDER:
            vms = [vim.VirtualMachine(m) for m in self.vms]
            props = {"name": "vm", "parent": DATACENTER}
            props["childEntity"] = vim.ManagedEntity.Array(vms)
        elif rec is DATASTORE:
            props = {"name": DS, "parent": DATACENTER}
        elif rec is SESSION_MANAGER:
            props = {"currentSession": session}
        else:
            props = {}
        return props

    def service_content(self, api_version: str) -> vim.ServiceInstanceContent:
        about = vim.AboutInfo(
            name="VMware vCenter Server",
            fullName="VMware vCenter Server (snapferry test simulator)",
            vendor="VMware, Inc.",
            version=api_version,
            build="0",
            osType="linux-x64",
            productLineId="vpx",
            apiType="VirtualCenter",
            apiVersion=api_version,
            instanceUuid="00000000-0000-0000-0000-00000000511a",
        )
        return vim.ServiceInstanceContent(
            rootFolder=ROOT_FOLDER,
            propertyCollector=PROPERTY_COLLECTOR,
            sessionManager=SESSION_MANAGER,
            searchIndex=SEARCH_INDEX,
            about=about,
        )

    def _vm_props(self, vm: Vm) -> dict[str, Any]:
        runtime = vim.vm.RuntimeInfo(
            connectionState="connected",
            powerState=vm.power,
            faultToleranceState="notConfigured",
            toolsInstallerMounted=False,
            numMksConnections=0,
            recordReplayState="inactive",
            onlineStandby=False,
            consolidationNeeded=False,
        )
        return {
            "name": vm.name,
            "parent": VM_FOLDER,
            "runtime": runtime,
            "config": self._config(vm),
            "snapshot": self._snapshot_info(vm),
            "datastore": vim.Datastore.Array([DATASTORE]),
        }

    def _config(self, vm: Vm) -> vim.vm.ConfigInfo:
        controller = vim.vm.device.VirtualLsiLogicController(
            key=1000,
            busNumber=0,
            sharedBus="noSharing",
            device=[2000 + i for i in range(len(vm.disks))],
            deviceInfo=vim.Description(label="SCSI controller 0", summary="LSI Logic"),
        )
        devices: list[vim.vm.device.VirtualDevice] = [controller]
        for i, size in enumerate(vm.disks):
            backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{DS}] {vm.name}/{disk_base(vm.name, i)}.vmdk",
                diskMode="persistent",
                thinProvisioned=True,
                datastore=DATASTORE,
            )
            devices.append(
                vim.vm.device.VirtualDisk(
                    key=2000 + i,
                    controllerKey=1000,
                    unitNumber=i,
                    capacityInKB=size // 1024,
                    capacityInBytes=size,
                    backing=backing,
                    deviceInfo=vim.Description(label=f"Hard disk {i + 1}", summary=f"{size} B"),
                )
            )
        return vim.vm.ConfigInfo(
            changeVersion=str(time.time_ns()),
            modified=now(),
            name=vm.name,
            guestFullName="Other Linux (64-bit)",
            version="vmx-19",
            uuid=vm.uuid,
            instanceUuid=vm.uuid,
            template=False,
            guestId="otherLinux64Guest",
            alternateGuestName="",
            files=vim.vm.FileInfo(vmPathName=f"[{DS}] {vm.name}/{vm.name}.vmx"),
            flags=vim.vm.FlagInfo(),
            defaultPowerOps=vim.vm.DefaultPowerOpInfo(),
            hardware=vim.vm.VirtualHardware(numCPU=1, memoryMB=512, device=devices),
        )

    def _snapshot_info(self, vm: Vm) -> vim.vm.SnapshotInfo | None:
        def tree(snap: Snap) -> vim.vm.SnapshotTree:
            return vim.vm.SnapshotTree(
                snapshot=vim.vm.Snapshot(snap.moid),
                vm=vim.VirtualMachine(vm.moid),
                name=snap.name,
                description=snap.description,
                id=snap.id,
                createTime=snap.created,
                state="poweredOn" if snap.memory else "poweredOff",
                quiesced=snap.quiesced,
                childSnapshotList=[tree(self.snaps[c]) for c in snap.children],
            )

        roots = [s for s in self.snaps.values() if s.vm == vm.moid and s.parent is None]
        if not roots:
            return None  # vSphere leaves vm.snapshot unset when there are no snapshots
        current = vim.vm.Snapshot(vm.current) if vm.current else None
        return vim.vm.SnapshotInfo(
            currentSnapshot=current, rootSnapshotList=[tree(r) for r in roots]
        )

    # ----- tasks -------------------------------------------------------------------

    def run_task(
        self, entity: Any, description_id: str, work: Callable[[], Any], delay: float = 0.0
    ) -> vim.Task:
        """Create a Task; run ``work`` now, or after ``delay`` seconds on a thread."""
        moid = self.new_moid("task")
        task = vim.Task(moid)
        info = vim.TaskInfo(
            key=moid,
            task=task,
            descriptionId=description_id,
            entity=entity,
            entityName=self.properties(entity)["name"],
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
                time.sleep(delay)
            with self.lock:
                try:
                    info.result = work()
                    info.state = "success"
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

    # ----- vSphere operations (the Task bodies raise MethodFaults) -----------------

    def find_by_inventory_path(self, path: str) -> Any:
        parts = path.strip("/").split("/")
        if parts[0] != DC:
            return None
        if len(parts) == 1:
            return DATACENTER
        if parts[1] != "vm":
            return None
        if len(parts) == 2:
            return VM_FOLDER
        vm = self.vm_by_name(parts[2]) if len(parts) == 3 else None
        return vim.VirtualMachine(vm.moid) if vm else None

    def create_snapshot(
        self, vm: Vm, name: str, description: str | None, memory: bool, quiesce: bool
    ) -> vim.vm.Snapshot:
        self._check_datastore(vm.name)
        snap = Snap(
            self.new_moid("snapshot"),
            vm.moid,
            vm.next_snap_id,
            name,
            description or "",
            now(),
            memory=bool(memory) and vm.power == "poweredOn",
            quiesced=bool(quiesce) and vm.power == "poweredOn",
            parent=vm.current,
        )
        vm.next_snap_id += 1
        for i in range(len(vm.disks)):
            sparse_copy(self.disk_file(vm, i), self.disk_file(vm, i, snap))
        if vm.current:
            self.snaps[vm.current].children.append(snap.moid)
        self.snaps[snap.moid] = snap
        vm.current = snap.moid
        return vim.vm.Snapshot(snap.moid)

    def revert(self, snap: Snap, suppress_power_on: bool) -> None:
        vm = self.vms[snap.vm]
        self._check_datastore(vm.name)
        for i in range(len(vm.disks)):
            sparse_copy(self.disk_file(vm, i, snap), self.disk_file(vm, i))
        vm.power = "poweredOn" if snap.memory and not suppress_power_on else "poweredOff"
        vm.current = snap.moid

    def remove_snapshot(self, snap: Snap, remove_children: bool) -> None:
        vm = self.vms[snap.vm]
        self._check_datastore(vm.name)
        siblings = self.snaps[snap.parent].children if snap.parent else None
        if siblings is not None:
            siblings.remove(snap.moid)
        doomed = [snap]
        if remove_children:
            for s in doomed:  # grows while iterating: the whole subtree
                doomed.extend(self.snaps[c] for c in s.children)
        else:
            for child in snap.children:
                self.snaps[child].parent = snap.parent
                if siblings is not None:
                    siblings.append(child)
        for s in doomed:
            del self.snaps[s.moid]
            for i in range(len(vm.disks)):
                self.disk_file(vm, i, s).unlink(missing_ok=True)
        if vm.current in {s.moid for s in doomed}:
            vm.current = snap.parent

    def clone(self, src: Vm, name: str, spec: vim.vm.CloneSpec) -> vim.VirtualMachine:
        """Full copy of the bytes at ``spec.snapshot`` (or now); the source is only read."""
        self._check_datastore(src.name)
        if self.vm_by_name(name) or (self.ds_dir / name).exists():
            raise vim.fault.DuplicateName(name=name, object=VM_FOLDER, msg=f"{name} exists")
        snap = None
        if spec.snapshot is not None:
            snap = self.resolve(spec.snapshot, vim.vm.Snapshot)
            if snap.vm != src.moid:
                raise vmodl.fault.InvalidArgument(invalidProperty="snapshot")
        vm = Vm(self.new_moid("vm"), name, list(src.disks))
        self._write_disks(vm, [self.disk_file(src, i, snap) for i in range(len(src.disks))])
        self.vms[vm.moid] = vm
        if spec.powerOn:
            vm.power = "poweredOn"
        return vim.VirtualMachine(vm.moid)

    def set_power(self, vm: Vm, state: str) -> None:
        if vm.power == state:
            raise vim.fault.InvalidPowerState(
                existingState=vm.power, requestedState=state, msg=f"VM is already {state}"
            )
        if state == "poweredOn":
            self._check_datastore(vm.name)
        vm.power = state

    def destroy(self, vm: Vm) -> None:
        if vm.power == "poweredOn":
            raise vim.fault.InvalidPowerState(
                existingState=vm.power, requestedState="poweredOff", msg="VM is powered on"
            )
        self._check_datastore(vm.name)
        shutil.rmtree(self.ds_dir / vm.name)
        for moid in [m for m, s in self.snaps.items() if s.vm == vm.moid]:
            del self.snaps[moid]
        del self.vms[vm.moid]
