"""What the VMware driver copies, against tests/vsphere_sim, through the driver's own calls
(no Temporal, so these run in about a second each):

- the take of one volume of a two-disk VM clones that disk only (the
  others are removed from the clone's config), counted in bytes the simulator's clone
  wrote and in files in the clone's folder, and the backup reads back byte-identical; a
  vCenter that refused the removal still gets a correct (full) clone;
- the datastore reader sends one ranged GET per window over one
  kept-alive connection, reopens at the asked offset for a non-contiguous read, and
  reopens where it got to after a connection cut mid-body; a server that ignores Range
  is still read correctly.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from snapferry.activities.contracts import (
    BackupPlan,
    HypervisorType,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.hypervisors.vmware import DatastoreReader, VmwareDriver
from snapferry.activities.settings import Settings
from tests.simulator import vcenter_config
from tests.vsphere_sim.control import (
    SimulatorProcess,
    create_vm,
    cut_next_get,
    disk_path,
    folder_stats,
    list_vms,
    set_ignore_range,
    set_inventory,
)

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
USER, PASSWORD = "administrator@vsphere.local", "disk copy s3cret"


@dataclass
class Sim:
    port: int
    root: Path
    settings: Settings

    def vm(self, name: str) -> dict:
        return next(v for v in list_vms(self.port) if v["name"] == name)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    proc = SimulatorProcess()
    port = proc.start(tmp_path / "vsphere", 0, USER, PASSWORD)
    vcenter = vcenter_config(port, tmp_path, user=USER, password=PASSWORD, datacenter="dc1")
    try:
        yield Sim(port, tmp_path / "vsphere", replace(Settings.from_env(), vcenter=vcenter))
    finally:
        proc.stop()


def fill(sim: Sim, vm: str, disk: int, size: int, seed: int) -> bytes:
    """Random data over the whole disk, written into its file on the simulated datastore
    (what the guest's writes do, without a control call per MiB); returns it."""
    data = random.Random(seed).randbytes(size)
    disk_path(sim.root, vm, disk).write_bytes(data)
    return data


def read_all(reader: DatastoreReader, chunk: int) -> bytes:
    (extent,) = reader.data_extents()
    got = bytearray(reader.virtual_size)
    for offset in range(0, reader.virtual_size, chunk):
        view = memoryview(got)[offset : min(offset + chunk, reader.virtual_size)]
        reader.read_range(extent, offset, view)
    return bytes(got)


def allocated(folder: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in folder.iterdir())


@pytest.mark.parametrize("disk_index", [0, 1])
def test_a_take_clones_only_the_requested_disk(sim: Sim, disk_index: int) -> None:
    sizes = [24 * MIB, 16 * MIB]
    create_vm(sim.port, "md01", sizes)
    data = [fill(sim, "md01", i, size, seed=40 + i) for i, size in enumerate(sizes)]
    name = "md01" if disk_index == 0 else "md01_1"
    driver = VmwareDriver(sim.settings)
    ref = VmRef(name="md01", host="vc1", hypervisor=HypervisorType.VMWARE)
    volume, sid = VolumeRef(vm=ref, disk=name), new_snapshot_id()

    primary = driver.take(volume=volume, snapshot_id=sid)
    clone = sim.vm(primary.overlay)
    # Only the asked disk was copied: its device key, its bytes, its two files.
    assert clone["disk_keys"] == [2000 + disk_index]
    assert clone["copied"] == sizes[disk_index]  # random data: every byte is allocated
    folder = sim.root / "ds1" / primary.overlay
    assert sorted(p.name for p in folder.iterdir()) == [
        f"{primary.overlay}-flat.vmdk",
        f"{primary.overlay}.vmdk",
    ]
    assert sizes[disk_index] <= allocated(folder) < sizes[disk_index] + MIB
    assert primary.virtual_size == sizes[disk_index]
    if disk_index:  # a retried take finds the same one-disk clone (once is enough)
        assert driver.take(volume=volume, snapshot_id=sid) == primary

    reader = driver.open_reader(primary, BackupPlan())
    try:
        assert read_all(reader, 8 * MIB) == data[disk_index]  # byte-identical
    finally:
        reader.close()
    driver.release(volume=volume, snapshot_id=sid, source=primary)
    assert {v["name"] for v in list_vms(sim.port)} == {"md01"}
    assert sim.vm("md01")["snapshots"] == []
    print(
        f"\nclone of disk {disk_index} of a {sum(sizes) // MIB} MiB two-disk VM wrote"
        f" {clone['copied'] // MIB} MiB (a clone of the whole VM: {sum(sizes) // MIB} MiB)"
    )


def test_a_vcenter_refusing_the_removal_gets_a_clone_of_every_disk(sim: Sim) -> None:
    set_inventory(sim.port, clone_removes_disks=False)
    sizes = [8 * MIB, 8 * MIB]
    create_vm(sim.port, "md02", sizes)
    data = fill(sim, "md02", 1, sizes[1], seed=42)
    driver = VmwareDriver(sim.settings)
    ref = VmRef(name="md02", host="vc1", hypervisor=HypervisorType.VMWARE)
    volume, sid = VolumeRef(vm=ref, disk="md02_1"), new_snapshot_id()
    primary = driver.take(volume=volume, snapshot_id=sid)
    assert sim.vm(primary.overlay)["disk_keys"] == [2000, 2001]  # the costly, correct way
    reader = driver.open_reader(primary, BackupPlan())
    try:
        assert read_all(reader, 8 * MIB) == data
    finally:
        reader.close()
    driver.release(volume=volume, snapshot_id=sid, source=primary)
    assert {v["name"] for v in list_vms(sim.port)} == {"md02"}


def test_the_reader_streams_windows_over_one_connection(sim: Sim) -> None:
    size = 16 * MIB
    create_vm(sim.port, "st01", [size])
    data = fill(sim, "st01", 0, size, seed=43)
    driver = VmwareDriver(sim.settings)
    path = "st01/st01-flat.vmdk"

    def reader(window: int) -> DatastoreReader:
        return DatastoreReader(driver.session, "ds1", path, size, window=window)

    # The default window (1 GiB) covers the disk: one GET for 16 chunks of 1 MiB.
    folder_stats(sim.port)
    r = reader(0)
    assert read_all(r, MIB) == data and r.requests == 1
    r.close()
    assert folder_stats(sim.port) == {"gets": 1, "connections": 1}

    # 4 MiB windows: 4 GETs, one kept-alive connection.
    r = reader(4 * MIB)
    assert read_all(r, MIB) == data and r.requests == 4
    assert folder_stats(sim.port) == {"gets": 4, "connections": 1}
    # A read elsewhere (a resumed copy) asks again from there, on a new connection.
    (extent,) = r.data_extents()
    view = memoryview(bytearray(MIB))
    r.read_range(extent, 9 * MIB, view)
    assert bytes(view) == data[9 * MIB : 10 * MIB] and r.requests == 5
    r.close()
    assert folder_stats(sim.port) == {"gets": 1, "connections": 1}

    # The connection is cut 1.5 MiB into the body: the reader asks again from where it
    # got to, and the bytes are the same.
    r = reader(0)
    cut_next_get(sim.port, 3 * MIB // 2)
    assert read_all(r, MIB) == data and r.requests == 2
    r.close()
    assert folder_stats(sim.port) == {"gets": 2, "connections": 2}

    # A server that ignores Range: one 200 read forward; a resume reads and drops.
    set_ignore_range(sim.port, True)
    r = reader(4 * MIB)
    assert read_all(r, MIB) == data and not r.ranges and r.requests == 1
    r.close()
    r = reader(4 * MIB)
    (extent,) = r.data_extents()
    r.read_range(extent, 12 * MIB, view)  # ranged GET answered 200: read forward, drop
    assert bytes(view) == data[12 * MIB : 13 * MIB] and r.dropped == 12 * MIB
    r.close()
