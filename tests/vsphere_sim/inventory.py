"""The simulated vCenter inventory: one datacenter, one datastore, VMs with real disk bytes.

Disk bytes live as files under ``<root>/ds1`` so tests can compare them directly.
Snapshots are *full copies* of each disk taken at snapshot time (vSphere writes
redo logs instead; the observable bytes are the same). Failures inside tasks are
reported through ``task.info.error`` as vSphere does, not as SOAP faults.

What the API *shows* of the disk chain is modelled as vSphere shows it: after a snapshot
a disk's backing is a delta ``<base>-00000N.vmdk`` whose ``backing.parent`` leads to the
base disk; a revert starts a new delta on the snapshot's file; removing snapshots
consolidates the chain, back to the base once none is left (see ``DiskChains``).
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

from .cbt import ChangeTracking

DC, DS = "dc1", "ds1"
SI = vim.ServiceInstance("ServiceInstance")
ROOT_FOLDER = vim.Folder("group-d1")
DATACENTER = vim.Datacenter("datacenter-2")
VM_FOLDER = vim.Folder("group-v3")
DATASTORE = vim.Datastore("datastore-11")
# A second datastore, so that a VM can have its home on one and a disk on another, and
# two disks may have the same file name on two datastores (base names are unique per
# datastore, not per VM).
DS2 = "ds2"
DATASTORE2 = vim.Datastore("datastore-12")
DATASTORES = {DS: DATASTORE, DS2: DATASTORE2}
PROPERTY_COLLECTOR = vmodl.query.PropertyCollector("propertyCollector")
SESSION_MANAGER = vim.SessionManager("SessionManager")
SEARCH_INDEX = vim.SearchIndex("SearchIndex")
FILE_MANAGER = vim.FileManager("FileManager")
_FIXED = {m._moId: m for m in (SI, ROOT_FOLDER, DATACENTER, VM_FOLDER, DATASTORE, DATASTORE2)}
_FIXED |= {m._moId: m for m in (PROPERTY_COLLECTOR, SESSION_MANAGER, SEARCH_INDEX, FILE_MANAGER)}
# Names of VMs and folders: "The name is too long. Up to 80 characters may be used (fewer
# if the characters %, \ or / are used)" (vCenter 6.7's answer, VMware KB 2051649;
# terraform-provider-vsphere validates StringLenBetween(1, 80),
# vsphere/virtual_machine_config_structure.go). CloneVM_Task: "Any % (percent) character
# used in this name parameter must be escaped, unless it is used to start an escape
# sequence" (vSphere API reference), so a % arrives as %25; / and \ are stored as %2f and
# %5c, three characters each.
MAX_NAME = 80


def now() -> datetime:
    return datetime.now(UTC)


def escaped_length(name: str) -> int:
    """A name's length as vCenter counts it: ``/`` and ``\\`` are stored as ``%2f``, ``%5c``."""
    return len(name) + 2 * (name.count("/") + name.count("\\"))


def disk_base(vm: str, index: int) -> str:
    """vSphere's naming: first disk ``<vm>``, later disks ``<vm>_<n>``."""
    return vm if index == 0 else f"{vm}_{index}"


def sparse_copy(src: Path, dst: Path) -> int:
    """Copy only the allocated extents (SEEK_DATA/SEEK_HOLE) so big zero disks stay cheap;
    returns the bytes written (what a test counts as a clone's copy cost)."""
    size, written = src.stat().st_size, 0
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
                written += len(chunk)
            pos = end
        fout.truncate(size)
    return written


# Datastore types whose VM disks are not files with a ``-flat.vmdk`` extent: ``/folder``
# answers 404 for them (OpenNebula/one#7788 for vSAN, libguestfs/virt-v2v#29). The names
# are DatastoreSummary.type's (HostFileSystemVolumeFileSystemType: VMFS, NFS, NFS41, CIFS,
# vsan, VFFS, VVOL, PMEM, vsanD, OTHER; vSphere Web Services API reference).
NO_FLAT_FILES = {"vsan", "vsanD", "VVOL"}


class DiskChains:
    """The names vSphere shows for one VM's disk files: a tree of descriptors per disk.

    vSphere API reference, VirtualDiskFlatVer2BackingInfo.parent: "The parent of this
    virtual disk file, if this is a delta disk backing. This will be unset if this is not a
    delta disk backing. [...] A delta disk backing can be added to a disk either implicitly
    during snapshot operations". The delta is named ``<base>-00000N.vmdk`` (the pattern
    libguestfs/virt-v2v strips in v2v/vCenter.ml, ``snapshot_re``). A snapshot freezes the
    file that was current; a revert starts a new delta on the snapshot's frozen file and
    drops the old current one; a removal consolidates: a file no snapshot needs merges
    with its only child, so the chain is the base again once no snapshot is left.

    Only names are modelled: the bytes stay full copies (``Inventory.disk_file``), and no
    ``-delta.vmdk`` extent is written to the datastore.
    """

    def __init__(self, bases: list[str]) -> None:
        self.bases = list(bases)
        self.parent: dict[str, str | None] = {f"{b}.vmdk": None for b in bases}
        self.top = [f"{b}.vmdk" for b in bases]

    def _new_delta(self, disk: int, parent: str) -> str:
        """The lowest unused number, so that a consolidated disk starts at -000001 again."""
        n = 1
        while (name := f"{self.bases[disk]}-{n:06d}.vmdk") in self.parent:
            n += 1
        self.parent[name] = parent
        return name

    def snapshot(self) -> list[str]:
        """Freeze every current file and put a new delta on top; returns the frozen files."""
        frozen = list(self.top)
        self.top = [self._new_delta(i, f) for i, f in enumerate(frozen)]
        return frozen

    def revert(self, frozen: list[str], still_frozen: set[str]) -> None:
        for i, old in enumerate(self.top):
            if old not in still_frozen and self.parent.get(old) is not None:
                del self.parent[old]  # the discarded current state
            self.top[i] = self._new_delta(i, frozen[i])

    def consolidate(self, frozen: list[list[str]]) -> None:
        """Merge away every file no snapshot needs, until nothing changes."""
        changed = True
        while changed:
            changed = False
            needed = {f for files in frozen for f in files} | set(self.top)
            for name, parent in list(self.parent.items()):
                children = [c for c, p in self.parent.items() if p == name]
                if name in needed or (parent is None and len(children) != 1):
                    continue
                if not children:  # a dead branch (its state was reverted away)
                    del self.parent[name]
                elif len(children) == 1:  # merge the only child into this file
                    child = children[0]
                    for c, p in list(self.parent.items()):
                        if p == child:
                            self.parent[c] = name
                    del self.parent[child]
                    self.top = [name if t == child else t for t in self.top]
                    for files in frozen:
                        files[:] = [name if f == child else f for f in files]
                else:
                    continue
                changed = True
                break

    def chain(self, disk: int) -> list[str]:
        """Current file first, base last."""
        out = [self.top[disk]]
        while (p := self.parent[out[-1]]) is not None:
            out.append(p)
        return out


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
    frozen: list[str] = field(default_factory=list)  # per disk: the file it froze


@dataclass
class Vm:
    """A VM: its disks are files named after it; ``current`` is the current snapshot."""

    moid: str
    name: str
    disks: list[int]  # capacity in bytes per disk
    power: str = "poweredOff"
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    bios_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    current: str | None = None
    next_snap_id: int = 1
    chains: DiskChains = field(init=False)
    folder: str = "group-v3"  # the VM folder it sits in
    complete: bool = True  # False while a clone is still copying into it
    # VirtualDevice.key per disk: 2000 + i for a new VM; a clone keeps the keys of the
    # source disks it copied (the driver finds its disk in the clone by key).
    keys: list[int] = field(default_factory=list)
    copied: int = 0  # test control: disk bytes its clone task wrote (the clone's cost)
    dir: str = ""  # its folder on each datastore: its name, or <name>_1 if that was taken
    home_ds: str = DS  # the datastore of its configuration (config.files.vmPathName)
    disk_ds: list[str] = field(default_factory=list)  # per disk: its datastore
    bases: list[str] = field(default_factory=list)  # per disk: its base file's stem
    consolidation_needed: bool = False  # runtime.consolidationNeeded
    # What its disks are (every disk alike). ``encrypted``: VM Encryption, config.keyId and
    # each backing's keyId set ("Data in an encrypted virtual disk (VMDK) file is not
    # written in cleartext to storage", vSphere Security). ``disk_mode``: VirtualDiskMode,
    # "independent_persistent: Same as persistent, but not affected by snapshots" (vSphere
    # API reference): a snapshot does not freeze such a disk, so a clone from a snapshot
    # reads it as it is now. ``backing``: "flat" (VirtualDiskFlatVer2BackingInfo), "rdm"
    # (RawDiskMappingVer1BackingInfo, a LUN with no -flat.vmdk), "sesparse".
    encrypted: bool = False
    disk_mode: str = "persistent"
    backing: str = "flat"
    # Test control: config.hardware.device lists its disks last first. The vSphere API
    # reference promises no order for VirtualHardware.device, and a reconfigure (a disk
    # removed and added back) changes it; a disk's name must not depend on it.
    reverse_devices: bool = False

    def __post_init__(self) -> None:
        self.dir = self.dir or self.name
        self.disk_ds = self.disk_ds or [self.home_ds] * len(self.disks)
        self.bases = self.bases or [disk_base(self.name, i) for i in range(len(self.disks))]
        # Chain names are per VM; two disks with one stem (on two datastores) get their
        # datastore as a prefix there, which the backings' file names leave out.
        clash = len(set(self.bases)) < len(self.bases)
        self.chains = DiskChains(
            [f"{d}/{b}" if clash else b for d, b in zip(self.disk_ds, self.bases, strict=True)]
        )
        self.keys = self.keys or [2000 + i for i in range(len(self.disks))]


class Inventory:
    """All state and vSphere operations; callers hold ``lock`` around every call."""

    def __init__(self, root: Path, user: str) -> None:
        self.ds_dirs: dict[str, Path] = {}
        for name in DATASTORES:
            (root / name).mkdir(parents=True, exist_ok=True)
            self.ds_dirs[name] = (root / name).resolve()
        self.ds_dir = self.ds_dirs[DS]
        self.ds_types = {name: "VMFS" for name in DATASTORES}
        self.user = user
        self.lock = threading.RLock()
        self.vms: dict[str, Vm] = {}
        self.snaps: dict[str, Snap] = {}
        self.tasks: dict[str, vim.TaskInfo] = {}
        self.datastore_gone = False
        self.clone_delay = 0.0
        self.ds_type = "VMFS"
        self.ignore_range = False
        self.cut_after: int | None = None  # test control: the next /folder GET stops early
        self.folder_gets: list[int] = []  # test control: each /folder GET's client port
        # ServiceContent.about.apiType: "VirtualCenter", or "HostAgent" for a standalone
        # ESXi host, which has no CloneVM_Task (it answers NotSupported, "The operation is
        # not supported on the object": nsidc/vagrant-vsphere#70).
        self.api_type = "VirtualCenter"
        # VirtualDisk.capacityInBytes exists since vSphere API 5.5; older inventories (and
        # govmomi's simulator) set only capacityInKB.
        self.capacity_in_bytes = True
        # Test control, not a behaviour seen on vSphere: False makes a clone whose
        # config.deviceChange removes disks answer NotSupported, so that the driver's
        # fallback to a clone of every disk (for a vCenter that would refuse) is exercised.
        self.clone_removes_disks = True
        self.folders: dict[str, tuple[str, str]] = {}  # sub-folder moid -> (name, parent)
        self.task_reads: dict[str, int] = {}  # test control: how often each task was polled
        self.calls: dict[str, int] = {}  # test control: SOAP calls per method
        # Test control: seconds CreateSnapshot_Task or RemoveSnapshot_Task stay running.
        self.task_delays: dict[str, float] = {}
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
        # Test control: RemoveSnapshot_Task takes the snapshot out of the tree but leaves
        # its redo logs ("the virtual disk associated with this snapshot will be merged with
        # other disk if possible", RemoveSnapshot_Task's consolidate, vSphere API
        # reference), as under a backup proxy's hot-add lock: the disk stays on its delta
        # and runtime.consolidationNeeded is true until ConsolidateVMDisks_Task.
        self.leave_deltas = False
        self.consolidate_fails = 0  # the next n ConsolidateVMDisks_Task fail (FileLocked)
        # Test control: the next CloneVM_Task is refused for a missing privilege (at the
        # call, as vCenter checks permissions: NoPermission, whose privilegeId names it,
        # vSphere API reference) or fails for space (in its task: NoDiskSpace, "This fault
        # is thrown when an operation fails because of insufficient disk space").
        self.clone_fault: str | None = None
        self.cbt = ChangeTracking()  # Changed Block Tracking (see cbt.py)
        self._ids = itertools.count(100)

    # ----- files -------------------------------------------------------------------

    def disk_file(self, vm: Vm, index: int, snap: Snap | None = None) -> Path:
        base = vm.bases[index]
        suffix = f"-snap{snap.id}" if snap else ""
        return self.ds_dirs[vm.disk_ds[index]] / vm.dir / f"{base}{suffix}-flat.vmdk"

    def vm_folders(self, vm: Vm) -> list[Path]:
        """The VM's folder on each datastore that holds its files (home first)."""
        names = dict.fromkeys([vm.home_ds, *vm.disk_ds])
        return [self.ds_dirs[n] / vm.dir for n in names]

    def _check_datastore(self, what: str) -> None:
        if self.datastore_gone:
            raise vim.fault.FileNotFound(file=f"[{DS}] {what}", msg=f"datastore {DS} is gone")

    def _write_disks(self, vm: Vm, sources: list[Path] | None) -> None:
        """Create a VM's flat files (copies of ``sources`` or zero-filled) and descriptors."""
        (self.ds_dirs[vm.home_ds] / vm.dir).mkdir(parents=True, exist_ok=False)
        for folder in self.vm_folders(vm):
            folder.mkdir(parents=True, exist_ok=True)
        for i, size in enumerate(vm.disks):
            flat = self.disk_file(vm, i)
            if sources:
                sparse_copy(sources[i], flat)
            else:
                with open(flat, "wb") as f:
                    f.truncate(size)
            base = vm.bases[i]
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

    def vm_by_dir(self, folder: str) -> Vm | None:
        """The registered VM whose files are in datastore folder ``folder``."""
        return next((v for v in self.vms.values() if v.dir == folder), None)

    def resolve(self, mo: Any, kind: type = ManagedObject) -> Any:
        """Return the record behind a moref, or raise ManagedObjectNotFound like vSphere.

        The moref's type must match too: ``Folder:vm-5`` is as unknown as ``vm-999``.
        """
        moid: str = getattr(mo, "_moId", "")
        for table, typ in (
            (self.vms, vim.VirtualMachine),
            (self.snaps, vim.vm.Snapshot),
            (self.tasks, vim.Task),
            (self.folders, vim.Folder),
            (_FIXED, type(_FIXED.get(moid))),
        ):
            if moid in table and isinstance(mo, typ) and isinstance(mo, kind):
                return table[moid]
        raise vmodl.fault.ManagedObjectNotFound(obj=mo, msg=f"object {moid} not found")

    def folder(self, path: str) -> str:
        """The moid of VM folder ``a/b`` under the datacenter's ``vm`` folder, made if new."""
        moid = VM_FOLDER._moId
        for part in [p for p in path.split("/") if p]:
            found = [m for m, (n, parent) in self.folders.items() if (n, parent) == (part, moid)]
            if found:
                moid = found[0]
            else:
                new = self.new_moid("group-v")
                self.folders[new] = (part, moid)
                moid = new
        return moid

    def create_vm(
        self, name: str, disks: list[int], power: str, folder: str = "", **kind: Any
    ) -> Vm:
        """Test-control entry point: a new VM with zero-filled disks, in VM folder
        ``folder`` (``a/b``; vSphere names are unique per folder, the simulator's globally,
        because each VM's directory on ds1 is its name). ``kind``: ``encrypted``,
        ``disk_mode``, ``backing`` (see Vm)."""
        if self.vm_by_name(name) or any(s % 512 for s in disks):
            raise ValueError("duplicate name or disk size not a multiple of 512")
        if set(kind) - {"encrypted", "disk_mode", "backing", "home_ds", "disk_ds", "bases"}:
            raise ValueError(f"unknown VM options {sorted(kind)}")
        vm = Vm(self.new_moid("vm"), name, list(disks), power, folder=self.folder(folder), **kind)
        self._write_disks(vm, None)
        self.vms[vm.moid] = vm
        return vm

    def guest_write(self, vm: Vm, disk: int, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > vm.disks[disk]:
            raise ValueError("write outside the disk")
        with open(self.disk_file(vm, disk), "r+b") as f:
            f.seek(offset)
            f.write(data)
        self.cbt.written(vm, disk, offset, len(data))

    # ----- properties ----------------------------------------------------------------

    def properties(
        self,
        mo: Any,
        api_version: str = "",
        session: vim.UserSession | None = None,
        sessions: list[vim.UserSession] | None = None,
    ) -> dict[str, Any]:
        """Every *modelled* property of an object; unset ones map to None."""
        rec = self.resolve(mo)
        if isinstance(rec, Vm):
            props = self._vm_props(rec)
        elif isinstance(rec, Snap):
            props = {
                "vm": vim.VirtualMachine(rec.vm),
                "childSnapshot": vim.vm.Snapshot.Array([vim.vm.Snapshot(c) for c in rec.children]),
                "config": self.cbt.snap_config.get(rec.moid),
            }
        elif isinstance(rec, vim.TaskInfo):
            props = {"info": rec}
        elif rec is SI:
            props = {"content": self.service_content(api_version)}
        elif rec is ROOT_FOLDER:
            props = {"name": "Datacenters", "childEntity": vim.ManagedEntity.Array([DATACENTER])}
        elif rec is DATACENTER:
            props = {"name": DC, "parent": ROOT_FOLDER, "vmFolder": VM_FOLDER}
            props["datastore"] = vim.Datastore.Array(list(DATASTORES.values()))
        elif rec is VM_FOLDER or isinstance(rec, tuple):
            moid = mo._moId
            name, parent = ("vm", DATACENTER) if rec is VM_FOLDER else (rec[0], vim.Folder(rec[1]))
            children: list[Any] = [vim.Folder(m) for m, f in self.folders.items() if f[1] == moid]
            children += [vim.VirtualMachine(m) for m, v in self.vms.items() if v.folder == moid]
            props = {"name": name, "parent": parent}
            props["childEntity"] = vim.ManagedEntity.Array(children)
        elif isinstance(rec, vim.Datastore) and rec._moId in {d._moId for d in DATASTORES.values()}:
            name = next(n for n, d in DATASTORES.items() if d._moId == rec._moId)
            props = {"name": name, "parent": DATACENTER, "summary": self._ds_summary(name)}
        elif rec is SESSION_MANAGER:
            # sessionList: "The list of currently active sessions" (vSphere API reference,
            # SessionManager), which a test reads to count what a driver holds.
            props = {"currentSession": session, "sessionList": list(sessions or [])}
        else:
            props = {}
        return props

    @property
    def ds_type(self) -> str:
        return self.ds_types[DS]

    @ds_type.setter
    def ds_type(self, value: str) -> None:
        self.ds_types[DS] = value

    def _ds_summary(self, name: str = DS) -> vim.Datastore.Summary:
        """DatastoreSummary as vSphere fills it; ``type`` is what a take checks (vsan and
        VVOL datastores hold no ``-flat.vmdk``, see NO_FLAT_FILES)."""
        usage = shutil.disk_usage(self.ds_dirs[name])
        return vim.Datastore.Summary(
            datastore=DATASTORES[name],
            name=name,
            url=f"ds:///vmfs/volumes/{name}/",
            capacity=usage.total,
            freeSpace=usage.free,
            type=self.ds_types[name],
            accessible=not self.datastore_gone,
            multipleHostAccess=True,
            maintenanceMode="normal",
        )

    def service_content(self, api_version: str) -> vim.ServiceInstanceContent:
        esxi = self.api_type == "HostAgent"
        product = "VMware ESXi" if esxi else "VMware vCenter Server"
        about = vim.AboutInfo(
            name=product,
            fullName=f"{product} (snapferry test simulator)",
            vendor="VMware, Inc.",
            version=api_version,
            build="0",
            osType="linux-x64",
            productLineId="embeddedEsx" if esxi else "vpx",
            apiType=self.api_type,
            apiVersion=api_version,
            instanceUuid="00000000-0000-0000-0000-00000000511a",
        )
        return vim.ServiceInstanceContent(
            rootFolder=ROOT_FOLDER,
            propertyCollector=PROPERTY_COLLECTOR,
            sessionManager=SESSION_MANAGER,
            searchIndex=SEARCH_INDEX,
            fileManager=FILE_MANAGER,
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
            consolidationNeeded=vm.consolidation_needed,
        )
        # ManagedEntity.recentTask: "The set of recent tasks operating on this managed
        # entity" (vSphere API reference); kept here while queued or running, and for ten
        # minutes after, as vCenter's task list does.
        recent = [
            t.task
            for t in self.tasks.values()
            if getattr(t.entity, "_moId", None) == vm.moid
            and (t.completeTime is None or (now() - t.completeTime).total_seconds() < 600)
        ]
        return {
            "name": vm.name,
            "parent": vim.Folder(vm.folder),
            "runtime": runtime,
            "config": self._config(vm),
            "snapshot": self._snapshot_info(vm),
            "datastore": vim.Datastore.Array(
                [DATASTORES[n] for n in dict.fromkeys([vm.home_ds, *vm.disk_ds])]
            ),
            "recentTask": vim.Task.Array(recent),
            "capability": self.cbt.capability(vm),
        }

    def _config(self, vm: Vm) -> vim.vm.ConfigInfo:
        controller = vim.vm.device.VirtualLsiLogicController(
            key=1000,
            busNumber=0,
            sharedBus="noSharing",
            device=list(vm.keys),
            deviceInfo=vim.Description(label="SCSI controller 0", summary="LSI Logic"),
        )
        devices: list[vim.vm.device.VirtualDevice] = [controller]
        key_id = None
        if vm.encrypted:
            key_id = vim.encryption.CryptoKeyId(
                keyId="6c2ea7d1-0001", providerId=vim.encryption.KeyProviderId(id="kms1")
            )
        for i, size in enumerate(vm.disks):
            backing: Any = None
            for qualified in reversed(vm.chains.chain(i)):  # base first: a delta's parent
                name = qualified.rpartition("/")[2]
                if vm.backing == "rdm":
                    backing = vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo(
                        fileName=f"[{vm.disk_ds[i]}] {vm.dir}/{name}",
                        compatibilityMode="physicalMode",
                        diskMode=vm.disk_mode,
                        lunUuid="0200000000600508b1001c",
                        deviceName="/vmfs/devices/disks/naa.600508b1001c",
                        datastore=DATASTORES[vm.disk_ds[i]],
                    )
                    break  # physical RDMs take no snapshots
                if vm.backing == "sesparse":
                    backing = vim.vm.device.VirtualDisk.SeSparseBackingInfo(
                        fileName=f"[{vm.disk_ds[i]}] {vm.dir}/{name}",
                        diskMode=vm.disk_mode,
                        datastore=DATASTORES[vm.disk_ds[i]],
                        parent=backing,
                        keyId=key_id,
                    )
                    continue
                backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=f"[{vm.disk_ds[i]}] {vm.dir}/{name}",
                    diskMode=vm.disk_mode,
                    thinProvisioned=True,
                    datastore=DATASTORES[vm.disk_ds[i]],
                    parent=backing,
                    deltaDiskFormat="seSparseFormat" if backing is not None else None,
                    keyId=key_id,
                )
            devices.append(
                vim.vm.device.VirtualDisk(
                    key=vm.keys[i],
                    controllerKey=1000,
                    unitNumber=vm.keys[i] - 2000,  # a clone's disk keeps its unit
                    capacityInKB=size // 1024,
                    capacityInBytes=size if self.capacity_in_bytes else None,
                    backing=backing,
                    deviceInfo=vim.Description(label=f"Hard disk {i + 1}", summary=f"{size} B"),
                )
            )
        if vm.reverse_devices:
            devices = [controller, *reversed(devices[1:])]
        config = vim.vm.ConfigInfo(
            changeVersion=str(time.time_ns()),
            modified=now(),
            name=vm.name,
            keyId=key_id,
            guestFullName="Other Linux (64-bit)",
            version="vmx-19",
            uuid=vm.bios_uuid,
            instanceUuid=vm.uuid,
            template=False,
            guestId="otherLinux64Guest",
            alternateGuestName="",
            files=vim.vm.FileInfo(vmPathName=f"[{vm.home_ds}] {vm.dir}/{vm.name}.vmx"),
            flags=vim.vm.FlagInfo(),
            defaultPowerOps=vim.vm.DefaultPowerOpInfo(),
            hardware=vim.vm.VirtualHardware(numCPU=1, memoryMB=512, device=devices),
        )
        return self.cbt.show(vm, config)

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

    # ----- vSphere operations (the Task bodies raise MethodFaults) -----------------

    def find_by_inventory_path(self, path: str) -> Any:
        """``dc1``, ``dc1/vm``, ``dc1/vm/<folder>/.../<name>``: each step a child's name."""
        parts = path.strip("/").split("/")
        if parts[0] != DC:
            return None
        if len(parts) == 1:
            return DATACENTER
        if parts[1] != "vm":
            return None
        found: Any = VM_FOLDER
        for part in parts[2:]:
            if not isinstance(found, vim.Folder):
                return None
            found = self.find_child(found, part)
            if found is None:
                return None
        return found

    def find_child(self, entity: Any, name: str) -> Any:
        """SearchIndex.FindChild: "Finds a particular managed entity based on its name" among
        the direct children of a folder (vSphere API reference)."""
        if entity._moId == DATACENTER._moId:
            return VM_FOLDER if name == "vm" else None
        folder = self.resolve(entity, vim.Folder)
        for child in self.properties(entity).get("childEntity", []) if folder else []:
            if self.properties(child)["name"] == name:
                return child
        return None

    def find_by_uuid(self, uuid_: str, instance: bool) -> Any:
        """SearchIndex.FindByUuid for VMs: the instance UUID (vCenter's) or the BIOS UUID."""
        for moid, vm in self.vms.items():
            if (vm.uuid if instance else vm.bios_uuid) == uuid_.lower():
                return vim.VirtualMachine(moid)
        return None

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
        self.cbt.snapshot_taken(vm, snap.moid, self._config(vm))
        for i in range(len(vm.disks)):
            if not vm.disk_mode.startswith("independent"):
                sparse_copy(self.disk_file(vm, i), self.disk_file(vm, i, snap))
        snap.frozen = vm.chains.snapshot()
        if vm.current:
            self.snaps[vm.current].children.append(snap.moid)
        self.snaps[snap.moid] = snap
        vm.current = snap.moid
        return vim.vm.Snapshot(snap.moid)

    def revert(self, snap: Snap, suppress_power_on: bool) -> None:
        vm = self.vms[snap.vm]
        self._check_datastore(vm.name)
        for i in range(len(vm.disks)):
            if not vm.disk_mode.startswith("independent"):
                sparse_copy(self.disk_file(vm, i, snap), self.disk_file(vm, i))
        frozen = {f for s in self.snaps.values() if s.vm == vm.moid for f in s.frozen}
        vm.chains.revert(snap.frozen, frozen)
        self.cbt.reverted(vm, snap.moid)
        vm.power = "poweredOn" if snap.memory and not suppress_power_on else "poweredOff"
        vm.current = snap.moid

    def remove_snapshot(self, snap: Snap, remove_children: bool) -> None:
        if snap.moid not in self.snaps:  # removed meanwhile (by a task started before)
            raise vmodl.fault.ManagedObjectNotFound(
                obj=vim.vm.Snapshot(snap.moid), msg=f"object {snap.moid} not found"
            )
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
        self.cbt.stunned(vm)
        for s in doomed:
            del self.snaps[s.moid]
            self.cbt.snapshot_removed(s.moid)
            for i in range(len(vm.disks)):
                self.disk_file(vm, i, s).unlink(missing_ok=True)
        if vm.current in {s.moid for s in doomed}:
            vm.current = snap.parent
        # Removing a snapshot consolidates its delta into the chain (vSphere's "delete
        # snapshot" merges it); with no snapshot left, every disk is its base file again.
        if self.leave_deltas:
            vm.consolidation_needed = True
            return
        vm.chains.consolidate([s.frozen for s in self.snaps.values() if s.vm == vm.moid])

    def consolidate_disks(self, vm: Vm) -> None:
        """VirtualMachine.ConsolidateVMDisks_Task: "Consolidate the virtual disk files of the
        virtual machine by finding hierarchies of redo logs that can be combined without
        violating data dependency" (vSphere API reference). A lock (a backup proxy's
        hot-add) makes it fail with FileLocked, the disk staying on its delta."""
        self._check_datastore(vm.name)
        if self.consolidate_fails > 0:
            self.consolidate_fails -= 1
            raise vim.fault.FileLocked(
                file=f"[{vm.disk_ds[0]}] {vm.dir}/{vm.chains.top[0]}",
                msg="Unable to access file since it is locked",
            )
        vm.chains.consolidate([s.frozen for s in self.snaps.values() if s.vm == vm.moid])
        vm.consolidation_needed = False

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

    def set_power(self, vm: Vm, state: str) -> None:
        if vm.power == state:
            raise vim.fault.InvalidPowerState(
                existingState=vm.power, requestedState=state, msg=f"VM is already {state}"
            )
        if state == "poweredOn":
            self._check_datastore(vm.name)
        vm.power = state
        if state == "poweredOn":
            self.cbt.stunned(vm)

    def destroy(self, vm: Vm) -> None:
        if not vm.complete:
            raise vim.fault.TaskInProgress(task=None, msg=f"{vm.name} is still being cloned")
        if vm.power == "poweredOn":
            raise vim.fault.InvalidPowerState(
                existingState=vm.power, requestedState="poweredOff", msg="VM is powered on"
            )
        self._check_datastore(vm.name)
        # Destroy_Task deletes the VM's own files: its disks (and their snapshot files), its
        # descriptors and configuration. A file in its folder that no disk of the VM uses
        # stays, and so does the folder then: CloudStack's worker VM was "destroy[ed] which
        # leaves the clone VM folder with volume VMDK inside" (apache/cloudstack#5333).
        for i in range(len(vm.disks)):
            base, folder = vm.bases[i], self.disk_file(vm, i).parent
            for f in [*folder.glob(f"{base}-snap*-flat.vmdk"), self.disk_file(vm, i)]:
                f.unlink(missing_ok=True)
            (folder / f"{base}.vmdk").unlink(missing_ok=True)
        for folder in self.vm_folders(vm):
            for f in folder.glob(".upload-*"):
                f.unlink()
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        for moid in [m for m, s in self.snaps.items() if s.vm == vm.moid]:
            del self.snaps[moid]
        del self.vms[vm.moid]
        self.cbt.forget(vm)

    def delete_datastore_file(self, name: str) -> None:
        """FileManager.DeleteDatastoreFile_Task: "Deletes the specified file or folder from
        the datastore. [...] Folder deletes are always recursive." A missing file is
        FileNotFound (vSphere API reference, its faults; govmomi's simulator answers the same,
        simulator/file_manager.go)."""
        ds, _, rel = name.partition("] ")
        self._check_datastore(name)
        root = self.ds_dirs.get(ds.lstrip("["))
        target = (root / rel).resolve() if root else None
        if root is None or target is None or not rel or not target.is_relative_to(root):
            raise vim.fault.InvalidDatastore(name=ds.lstrip("["), msg=f"no datastore path {name}")
        if not target.exists():
            raise vim.fault.FileNotFound(file=name, msg=f"File {name} was not found")
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()

    def move_into_folder(self, folder: str, entities: list[Any]) -> None:
        """Folder.MoveIntoFolder_Task for VMs: "Moves a set of managed entities into this
        folder" (vSphere API reference); the VM keeps its moref and its files."""
        for mo in entities:
            self.resolve(mo, vim.VirtualMachine).folder = folder
