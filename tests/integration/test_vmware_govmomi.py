"""The VMware driver's real calls against a second, independent simulator: govmomi's
(tests/govmomi_sim, Debian's golang-github-vmware-govmomi-dev behind a Go main of ours).
Someone else's reading of the vSphere API: login, find, take (snapshot, full clone,
remove), the ranged datastore GET, VM snapshots create/revert/delete, power operations and
release. The simulator's known defects are worked around in the Go main, not the driver."""

from __future__ import annotations

import http.client
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from snapferry.activities.contracts import (
    BackupPlan,
    HypervisorType,
    VmRef,
    VmSnapshotOperation,
    VmSnapshotType,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import CredentialsRejected, InvalidInput
from snapferry.activities.hypervisors.vmware import VmwareDriver
from snapferry.activities.settings import Settings
from tests.govmomi_sim.control import GovmomiSimulator, missing
from tests.simulator import vcenter_config

pytestmark = pytest.mark.integration


def test_the_govmomi_simulator_can_be_built_here() -> None:
    """Never skipped: scripts/bootstrap.sh installs its Debian packages and builds it."""
    assert missing() is None, missing()


MIB = 1024 * 1024
USER, PASSWORD = "administrator@vsphere.local", "govmomi s3cret"
DS = "LocalDS_0"


@dataclass
class Govmomi:
    port: int
    settings: Settings

    def connect(self) -> Any:
        return SmartConnect(
            protocol="http", host="127.0.0.1", port=self.port, user=USER, pwd=PASSWORD
        )

    def folder(
        self, method: str, path: str, body: bytes | None = None, ds: str = "LocalDS_0"
    ) -> tuple[int, bytes]:
        """The datastore file protocol, as a user (or the guest's writes) would use it."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, f"/folder/{path}?dcPath=DC0&dsName={ds}", body)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


@pytest.fixture
def govmomi(tmp_path: Path) -> Iterator[Govmomi]:
    sim = GovmomiSimulator()
    port = sim.start(USER, PASSWORD)
    vcenter = vcenter_config(port, tmp_path, user=USER, password=PASSWORD, datacenter="DC0")
    try:
        yield Govmomi(port, replace(Settings.from_env(), vcenter=vcenter))
    finally:
        sim.stop()


def wait(task: Any) -> Any:
    while task.info.state not in ("success", "error"):
        time.sleep(0.05)
    assert task.info.state == "success", task.info.error
    return task.info.result


def create_vm(si: Any, name: str, *sizes: int, datastores: tuple[str, ...] = ()) -> Any:
    """A VM with thin disks of these sizes, made as a vSphere user would (CreateVM_Task),
    its home on LocalDS_0 and each disk on ``datastores[i]`` (default LocalDS_0 too)."""
    content = si.RetrieveContent()
    dc = content.searchIndex.FindByInventoryPath("DC0")
    pool = dc.hostFolder.childEntity[0].resourcePool
    ctrl = vim.vm.device.VirtualLsiLogicController(key=1000, busNumber=0, sharedBus="noSharing")
    disks = [
        vim.vm.device.VirtualDisk(
            key=-1 - i,
            controllerKey=1000,
            unitNumber=i,
            capacityInKB=size // 1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{datastores[i] if datastores else DS}]",
                diskMode="persistent",
                thinProvisioned=True,
            ),
        )
        for i, size in enumerate(sizes)
    ]
    spec = vim.vm.ConfigSpec(
        name=name,
        guestId="otherLinux64Guest",
        numCPUs=1,
        memoryMB=64,
        files=vim.vm.FileInfo(vmPathName=f"[{DS}]"),
        deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="add", device=ctrl),
            *(
                vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=d)
                for d in disks
            ),
        ],
    )
    return wait(dc.vmFolder.CreateVM_Task(config=spec, pool=pool))


def disk_files_of(vm: Any) -> list[str]:
    return disk_files(vm)


def disk_files(vm: Any) -> list[str]:
    return [
        d.backing.fileName
        for d in vm.config.hardware.device
        if isinstance(d, vim.vm.device.VirtualDisk)
    ]


def test_the_drivers_calls_against_govmomis_simulator(govmomi: Govmomi) -> None:
    size = 16 * MIB
    si = govmomi.connect()
    vm = create_vm(si, "web01", size)  # one disk
    data = random.Random(31).randbytes(size)
    assert govmomi.folder("PUT", "web01/web01-flat.vmdk", data)[0] in (200, 201)  # the guest
    wait(vm.PowerOnVM_Task())
    driver = VmwareDriver(govmomi.settings)
    ref = VmRef(name="web01", host="vc1", hypervisor=HypervisorType.VMWARE)
    volume = VolumeRef(vm=ref, disk="web01")
    sid = new_snapshot_id()
    clone = f"web01-snapferry-{sid}"

    # Take: login, find, snapshot, full clone, snapshot removed.
    primary = driver.take(volume=volume, snapshot_id=sid)
    assert primary.image == f"[{DS}] {clone}/{clone}-flat.vmdk"
    assert primary.virtual_size == size and primary.vm_was_running  # from capacityInKB
    assert vm.snapshot is None and disk_files(vm) == [f"[{DS}] web01/web01.vmdk"]
    index = si.RetrieveContent().searchIndex
    assert index.FindByInventoryPath(f"DC0/vm/{clone}") is not None
    # A retried take finds its clone: nothing new is made.
    assert driver.take(volume=volume, snapshot_id=sid) == primary
    assert len(index.FindByInventoryPath("DC0/vm").childEntity) == 2

    # The ranged datastore GET, as the backup reads the clone's flat disk.
    reader = driver.open_reader(primary, BackupPlan())
    (extent,) = reader.data_extents()
    got = bytearray(size)
    for offset in range(0, size, 4 * MIB):
        reader.read_range(extent, offset, memoryview(got)[offset : offset + 4 * MIB])
    reader.close()
    assert reader.ranges and bytes(got) == data  # 206s all along, the bytes at the take

    # VM snapshots: Disk (revert needs the VM off) and DiskAndMemory (the driver resumes).
    disk_op = VmSnapshotOperation(snapshot_id=new_snapshot_id(), vm=ref, type=VmSnapshotType.DISK)
    mem_op = VmSnapshotOperation(
        snapshot_id=new_snapshot_id(), vm=ref, type=VmSnapshotType.DISK_AND_MEMORY
    )
    assert driver.take_vm_snapshot(disk_op).vm_was_running
    driver.take_vm_snapshot(mem_op)
    names = {n.name for n in vm.snapshot.rootSnapshotList}
    names |= {c.name for n in vm.snapshot.rootSnapshotList for c in n.childSnapshotList}
    assert names == {f"snapferry-vm-{disk_op.snapshot_id}", f"snapferry-vm-{mem_op.snapshot_id}"}
    driver.revert_vm_snapshot(mem_op)
    assert vm.runtime.powerState == "poweredOn"
    wait(vm.PowerOffVM_Task())
    driver.revert_vm_snapshot(disk_op)
    assert vm.runtime.powerState == "poweredOff"
    driver.delete_vm_snapshot(mem_op)
    driver.delete_vm_snapshot(disk_op)
    assert vm.snapshot is None

    # Release: the clone is powered off if needed and destroyed; the VM keeps its disk.
    driver.release(volume=volume, snapshot_id=sid, source=primary)
    assert index.FindByInventoryPath(f"DC0/vm/{clone}") is None
    assert disk_files(vm) == [f"[{DS}] web01/web01.vmdk"]
    assert govmomi.folder("GET", "web01/web01-flat.vmdk") == (200, data)
    Disconnect(si)

    # Rejected credentials are CredentialsRejected.
    wrong = Path(govmomi.settings.vcenter.password_file or "").with_name("wrong")
    wrong.write_text("not it")
    bad = replace(govmomi.settings.vcenter, password_file=str(wrong))
    with pytest.raises(CredentialsRejected):
        VmwareDriver(replace(govmomi.settings, vcenter=bad)).take(volume=volume, snapshot_id=sid)


def clone_folder_files(si: Any, clone: str) -> list[str]:
    """The files in the clone's datastore folder, as a vSphere user lists them
    (HostDatastoreBrowser.SearchDatastore_Task)."""
    dc = si.RetrieveContent().searchIndex.FindByInventoryPath("DC0")
    ds = next(d for d in dc.datastore if d.name == DS)
    spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*"])
    result = wait(ds.browser.SearchDatastore_Task(datastorePath=f"[{DS}] {clone}", searchSpec=spec))
    return sorted(f.path for f in result.file)


def folder_gone(si: Any, folder: str, name: str = DS) -> bool:
    """Whether ``[<name>] folder`` is gone: SearchDatastore_Task answers FileNotFound."""
    dc = si.RetrieveContent().searchIndex.FindByInventoryPath("DC0")
    ds = next(d for d in dc.datastore if d.name == name)
    spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*"])
    task = ds.browser.SearchDatastore_Task(datastorePath=f"[{name}] {folder}", searchSpec=spec)
    while task.info.state not in ("success", "error"):
        time.sleep(0.05)
    return task.info.state == "error" and isinstance(task.info.error, vim.fault.FileNotFound)


def test_a_take_of_one_disk_of_two_clones_that_disk_only(govmomi: Govmomi) -> None:
    """Against govmomi's simulator: the clone of a two-disk VM for a snapshot of its second
    disk has that disk only. This simulator copies the removed disk into the clone's folder
    too, and only detaches it; after the release nothing of the clone's folder is left."""
    si = govmomi.connect()
    vm = create_vm(si, "db01", 8 * MIB, 12 * MIB)
    data = random.Random(32).randbytes(12 * MIB)
    assert govmomi.folder("PUT", "db01/db01_1-flat.vmdk", data)[0] in (200, 201)
    other = random.Random(33).randbytes(8 * MIB)
    assert govmomi.folder("PUT", "db01/db01-flat.vmdk", other)[0] in (200, 201)
    driver = VmwareDriver(govmomi.settings)
    ref = VmRef(name="db01", host="vc1", hypervisor=HypervisorType.VMWARE)
    volume, sid = VolumeRef(vm=ref, disk="db01_1"), new_snapshot_id()

    primary = driver.take(volume=volume, snapshot_id=sid)
    clone = si.RetrieveContent().searchIndex.FindByInventoryPath(f"DC0/vm/{primary.overlay}")
    kept = [d for d in clone.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    source_key = [
        d.key for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
    ]
    assert [d.key for d in kept] == [source_key[1]] and primary.virtual_size == 12 * MIB
    files = clone_folder_files(si, primary.overlay)
    disk_files = [f for f in files if f.endswith(".vmdk")]
    stem = Path(kept[0].backing.fileName.partition("] ")[2]).name.removesuffix(".vmdk")
    assert {f"{stem}.vmdk", f"{stem}-flat.vmdk"} <= set(disk_files), files
    detached = sorted(set(disk_files) - {f"{stem}.vmdk", f"{stem}-flat.vmdk"})
    print(f"\ngovmomi: the clone's folder also holds the removed disk's files {detached}")
    assert disk_files_of(vm) == ["[LocalDS_0] db01/db01.vmdk", "[LocalDS_0] db01/db01_1.vmdk"]

    reader = driver.open_reader(primary, BackupPlan())
    (extent,) = reader.data_extents()
    got = bytearray(12 * MIB)
    for offset in range(0, 12 * MIB, 4 * MIB):
        reader.read_range(extent, offset, memoryview(got)[offset : offset + 4 * MIB])
    reader.close()
    assert bytes(got) == data  # byte-identical
    driver.release(volume=volume, snapshot_id=sid, source=primary)
    assert si.RetrieveContent().searchIndex.FindByInventoryPath(f"DC0/vm/{primary.overlay}") is None
    assert folder_gone(si, primary.overlay)
    assert govmomi.folder("GET", "db01/db01-flat.vmdk") == (200, other)
    Disconnect(si)


def test_release_finds_the_clone_by_moref_after_the_vm_moved(govmomi: Govmomi) -> None:
    """The VM moves to another folder (MoveIntoFolder_Task) after the take; its clone
    stays in the old one. The release finds the clone by the moref the record keeps."""
    si = govmomi.connect()
    vm = create_vm(si, "mv01", 4 * MIB)
    driver = VmwareDriver(govmomi.settings)
    ref = VmRef(name="mv01", host="vc1", hypervisor=HypervisorType.VMWARE)
    volume, sid = VolumeRef(vm=ref, disk="mv01"), new_snapshot_id()
    primary = driver.take(volume=volume, snapshot_id=sid)
    index = si.RetrieveContent().searchIndex
    clone = index.FindByInventoryPath(f"DC0/vm/{primary.overlay}")
    assert clone is not None and primary.handle == clone._moId
    archive = index.FindByInventoryPath("DC0/vm").CreateFolder("archive")
    wait(archive.MoveIntoFolder_Task([vm]))
    assert index.FindByInventoryPath("DC0/vm/archive/mv01") is not None
    driver.release(volume=volume, snapshot_id=sid, source=primary)
    assert index.FindByInventoryPath(f"DC0/vm/{primary.overlay}") is None
    assert folder_gone(si, primary.overlay)
    Disconnect(si)


def test_two_disks_with_one_stem_on_two_datastores(govmomi: Govmomi) -> None:
    """govmomi names a new disk after its VM in the VM's folder on the datastore it goes
    to, so a VM with a disk on each datastore has ``[LocalDS_0] gd01/gd01.vmdk`` and
    ``[LocalDS_1] gd01/gd01.vmdk``. The bare ``gd01`` is refused, naming both; each is
    taken by ``gd01.<datastore>`` and reads back as itself. govmomi's CloneVM_Task ignores
    disk locators (it reads spec.location.datastore only), so the clone's disk lands on the
    clone's home, LocalDS_0, a VMFS datastore the driver accepts; the release leaves no
    folder on either datastore."""
    si = govmomi.connect()
    vm = create_vm(si, "gd01", 4 * MIB, 6 * MIB, datastores=("LocalDS_0", "LocalDS_1"))
    assert disk_files(vm) == ["[LocalDS_0] gd01/gd01.vmdk", "[LocalDS_1] gd01/gd01.vmdk"]
    data = [random.Random(34 + i).randbytes(n) for i, n in enumerate((4 * MIB, 6 * MIB))]
    for ds, content in zip(("LocalDS_0", "LocalDS_1"), data, strict=True):
        assert govmomi.folder("PUT", "gd01/gd01-flat.vmdk", content, ds=ds)[0] in (200, 201)
    driver = VmwareDriver(govmomi.settings)
    ref = VmRef(name="gd01", host="vc1", hypervisor=HypervisorType.VMWARE)
    with pytest.raises(InvalidInput, match=r"gd01\.LocalDS_0.*gd01\.LocalDS_1"):
        driver.take(volume=VolumeRef(vm=ref, disk="gd01"), snapshot_id=new_snapshot_id())
    for index, ds in enumerate(("LocalDS_0", "LocalDS_1")):
        volume, sid = VolumeRef(vm=ref, disk=f"gd01.{ds}"), new_snapshot_id()
        primary = driver.take(volume=volume, snapshot_id=sid)
        assert primary.virtual_size == len(data[index])
        print(f"\ngovmomi: the clone of the disk on {ds} is {primary.image}")
        reader = driver.open_reader(primary, BackupPlan())
        (extent,) = reader.data_extents()
        got = bytearray(reader.virtual_size)
        for offset in range(0, reader.virtual_size, 2 * MIB):
            reader.read_range(extent, offset, memoryview(got)[offset : offset + 2 * MIB])
        reader.close()
        assert bytes(got) == data[index]
        driver.release(volume=volume, snapshot_id=sid, source=primary)
        assert folder_gone(si, primary.overlay or "", "LocalDS_0")
        assert folder_gone(si, primary.overlay or "", "LocalDS_1")
    for ds, content in zip(("LocalDS_0", "LocalDS_1"), data, strict=True):
        assert govmomi.folder("GET", "gd01/gd01-flat.vmdk", ds=ds) == (200, content)
    Disconnect(si)


@pytest.fixture
def govmomi_idle(tmp_path: Path) -> Iterator[Govmomi]:
    """govmomi's simulator ending each session 1 s after its last SOAP call."""
    sim = GovmomiSimulator()
    port = sim.start(USER, PASSWORD, idle_timeout=1.0)
    vcenter = vcenter_config(port, tmp_path, user=USER, password=PASSWORD, datacenter="DC0")
    try:
        yield Govmomi(port, replace(Settings.from_env(), vcenter=vcenter))
    finally:
        sim.stop()


def others_sessions(govmomi: Govmomi) -> int:
    """Live sessions other than this look's own (SessionManager.sessionList, "The list of
    currently active sessions"), as an administrator would count them."""
    si = govmomi.connect()
    try:
        manager = si.RetrieveContent().sessionManager
        own = manager.currentSession.key
        return len([s for s in manager.sessionList if s.key != own])
    finally:
        Disconnect(si)


def test_an_expired_session_is_renewed_under_the_objects_the_driver_holds(
    govmomi_idle: Govmomi,
) -> None:
    """govmomi ends the driver's session while it holds the VM's managed object (between
    the find and its next read, and between a take and its release). The driver logs in
    again on the same stub, so the object it holds works on; a renewal of a session that
    is still live logs that one out first (govmomi refuses a Login on a live session,
    validLogin), and the driver never holds more than one session."""
    si = govmomi_idle.connect()
    create_vm(si, "gi01", 4 * MIB)
    Disconnect(si)
    driver = VmwareDriver(govmomi_idle.settings)
    vm = driver._vm("gi01")
    time.sleep(2.5)  # govmomi's idle watch runs every SessionIdleTimeout
    assert driver.session.call(lambda _si: vm.name, "reading the held VM's name") == "gi01"
    assert driver.session.renewals == 1
    ref = VmRef(name="gi01", host="vc1", hypervisor=HypervisorType.VMWARE)
    volume, sid = VolumeRef(vm=ref, disk="gi01"), new_snapshot_id()
    primary = driver.take(volume=volume, snapshot_id=sid)
    time.sleep(2.5)
    driver.release(volume=volume, snapshot_id=sid, source=primary)
    assert others_sessions(govmomi_idle) == 1
    driver.session.renew(driver.session.cookie())  # a live session replaced
    assert driver.session.call(lambda _si: vm.name, "reading the held VM's name") == "gi01"
    assert others_sessions(govmomi_idle) == 1
    driver.session.close()
    assert others_sessions(govmomi_idle) == 0


def test_cbt_against_govmomis_simulator_gives_fulls_that_say_why(govmomi: Govmomi) -> None:
    """govmomi's simulator (0.24.2) applies ``changeTrackingEnabled`` from ReconfigVM_Task
    (simulator/virtual_machine.go, configure) but leaves ``capability
    .changeTrackingSupported`` unset, gives no disk a ``changeId`` and has no
    QueryChangedDiskAreas. So the take does not turn CBT on there; turned on by an operator,
    the snapshot still has no changeId, no snapshot is kept, and each plan is a full that
    says CBT gave nothing."""
    si = govmomi.connect()
    vm = create_vm(si, "cbt01", 4 * MIB)
    wait(vm.PowerOnVM_Task())
    assert not vm.capability.changeTrackingSupported and not vm.config.changeTrackingEnabled
    driver = VmwareDriver(govmomi.settings)
    volume = VolumeRef(
        vm=VmRef(name="cbt01", host="vc1", hypervisor=HypervisorType.VMWARE), disk="cbt01"
    )
    sid1, sid2 = new_snapshot_id(), new_snapshot_id()
    first = driver.take(volume=volume, snapshot_id=sid1)
    assert not vm.config.changeTrackingEnabled  # not supported: not turned on
    wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert vm.config.changeTrackingEnabled
    second = driver.take(volume=volume, snapshot_id=sid2)
    assert first.change_id is None and second.change_id is None
    assert vm.snapshot is None  # nothing kept without a changeId
    plan = driver.plan_backup(second, [_Entry(sid1)])
    assert plan.parent is None and "Changed Block Tracking was not on" in (plan.reason or "")
    for sid, primary in ((sid1, first), (sid2, second)):
        driver.release(volume=volume, snapshot_id=sid, source=primary)
    Disconnect(si)


class _Entry:
    """A finished backup as plan_backup reads it (BackupHistoryEntry)."""

    def __init__(self, snapshot_id: str) -> None:
        self.snapshot_id, self.change_id, self.depth, self.source = snapshot_id, None, 0, ""
        self.virtual_size = 0
