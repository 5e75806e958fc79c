"""Simulated VMs: their disks and devices as config.hardware shows them, their runtime,
power operations and Destroy_Task.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pyVmomi import vim

from .objects import DATASTORES, DS, now
from .snapshots import DiskChains


def disk_base(vm: str, index: int) -> str:
    """vSphere's naming: first disk ``<vm>``, later disks ``<vm>_<n>``."""
    return vm if index == 0 else f"{vm}_{index}"


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
    # VMware Tools in the guest: "running", "notRunning" or "notInstalled", shown as
    # GuestInfo.toolsRunningStatus (VirtualMachineToolsRunningStatus: guestToolsRunning,
    # "VMware Tools is running"; guestToolsNotRunning) and the older toolsStatus
    # (VirtualMachineToolsStatus: toolsOk; toolsNotRunning; toolsNotInstalled, "VMware
    # Tools has never been installed or has not run in the virtual machine"), vSphere API
    # reference. A stopped VM runs no Tools. Set with ``/sim/guest``.
    tools: str = "running"
    # Test control: the next n quiesced snapshots of this VM fail with this fault (see
    # Snapshots.create_snapshot).
    quiesce_fails: int = 0
    quiesce_fault: str = "ApplicationQuiesceFault"

    def tools_running(self) -> bool:
        return self.tools == "running" and self.power == "poweredOn"

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


class Vms:
    """The VMs' part of the Inventory (see inventory.py)."""

    def _init_vms(self) -> None:
        self.vms: dict[str, Vm] = {}
        # VirtualDisk.capacityInBytes exists since vSphere API 5.5; older inventories (and
        # govmomi's simulator) set only capacityInKB.
        self.capacity_in_bytes = True

    def vm_by_name(self, name: str) -> Vm | None:
        return next((v for v in self.vms.values() if v.name == name), None)

    def vm_by_dir(self, folder: str) -> Vm | None:
        """The registered VM whose files are in datastore folder ``folder``."""
        return next((v for v in self.vms.values() if v.dir == folder), None)

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
            "guest": self._guest(vm),
        }

    @staticmethod
    def _guest(vm: Vm) -> vim.vm.GuestInfo:
        """VirtualMachine.guest as far as VMware Tools go (see Vm.tools)."""
        running = vm.tools_running()
        status = "toolsOk" if running else "toolsNotRunning"
        return vim.vm.GuestInfo(
            toolsStatus=status if vm.tools != "notInstalled" else "toolsNotInstalled",
            toolsRunningStatus="guestToolsRunning" if running else "guestToolsNotRunning",
            guestState="running" if running else "notRunning",
        )

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

    def move_into_folder(self, folder: str, entities: list[Any]) -> None:
        """Folder.MoveIntoFolder_Task for VMs: "Moves a set of managed entities into this
        folder" (vSphere API reference); the VM keeps its moref and its files."""
        for mo in entities:
            self.resolve(mo, vim.VirtualMachine).folder = folder
