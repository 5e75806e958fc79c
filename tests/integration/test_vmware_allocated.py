"""What a VMware backup reads of a thin disk, against tests/vsphere_sim: a full reads only
the areas ``QueryChangedDiskAreas(changeId="*")`` answers allocated, and falls back to the
whole disk where that call cannot be made; a login without
VirtualMachine.Provisioning.DiskRandomRead (the privilege ``QueryChangedDiskAreas`` requires)
gets fulls of the whole disk instead of deltas, and the reason names the privilege.

- The volume's first full, on a VM with CBT on, reads the written areas only: bytes
  copied equal the data written, not the disk's size, and the backup restores
  byte-identical.
- Without CBT support, on the take that turns CBT on (no snapshot kept to ask), and without
  the privilege, a full reads the whole disk, byte-identical.
- Without the privilege, a delta's reader raises SourceGone naming it, and the backup
  becomes a full that says so.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    BackupPlan,
    RevertRequest,
    SnapshotState,
    new_snapshot_id,
)
from snapferry.activities.errors import PermissionDenied, SourceGone
from snapferry.activities.hypervisors.vmware import VmwareDriver
from snapferry.activities.storage.secondary import SecondaryStore
from snapferry.workers.worker import running_workers
from tests.vsphere_sim.control import cbt, create_vm, disk_path, guest_write, set_file_access

from ..conftest import Vsphere
from .test_vmware_cbt import _Entry, backed_up, enable_cbt, restores_to, scatter, snapshots_of
from .test_vmware_clones import volume
from .test_vmware_disk_copy import PASSWORD, Sim, sim
from .test_vmware_placement import back_up

__all__ = ["sim"]

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
SIZE = 256 * MIB
# Where the guest wrote on the thin disk: (offset, length), sector-aligned.
DATA = [(0, MIB), (37 * MIB + 4096, 3 * MIB), (200 * MIB, 2 * MIB + 512), (SIZE - MIB, MIB)]
PRIVILEGE = "VirtualMachine.Provisioning.DiskRandomRead"


def write_data(port: int, vm: str) -> int:
    rng = random.Random(11)
    for offset, length in DATA:
        guest_write(port, vm, offset, rng.randbytes(length))
    return sum(n for _, n in DATA)


def read_whole(reader: object) -> bytes:
    """The disk as the backup sees it: its data extents read, zeros between them."""
    out = bytearray(reader.virtual_size)  # type: ignore[attr-defined]
    for e in reader.data_extents():  # type: ignore[attr-defined]
        view = memoryview(out)[e.start : e.start + e.length]
        for at in range(0, e.length, 8 * MIB):
            n = min(8 * MIB, e.length - at)
            reader.read_range(e, e.start + at, view[at : at + n])  # type: ignore[attr-defined]
    return bytes(out)


def test_a_first_full_reads_only_the_allocated_areas(sim: Sim) -> None:
    """CBT is on before the take, which keeps its snapshot, so the full's reader asks
    ``QueryChangedDiskAreas(snapshot, key, offset, "*")`` and reads only those areas, one
    GET each; the rest of the disk is zeros. The kept snapshot goes at release."""
    create_vm(sim.port, "al01", [SIZE])
    enable_cbt(sim.port, "al01", PASSWORD)
    written = write_data(sim.port, "al01")
    at_take = disk_path(sim.root, "al01", 0).read_bytes()
    driver = VmwareDriver(sim.settings)
    sid = new_snapshot_id()
    primary = driver.take(volume=volume("al01", "al01"), snapshot_id=sid)
    assert snapshots_of(sim, "al01") != []  # kept, to be asked what is allocated
    reader = driver.open_reader(primary, BackupPlan(reason="the volume's first backup"))
    try:
        extents = [(e.start, e.length) for e in reader.data_extents()]
        # The simulator answers its file's allocation, in the file system's 4 KiB blocks.
        assert written <= sum(n for _, n in extents) <= written + 4096 * len(DATA), extents
        assert read_whole(reader) == at_take
        assert reader.requests == len(DATA)
    finally:
        reader.close()
    driver.release(volume=volume("al01", "al01"), snapshot_id=sid, source=primary)
    assert snapshots_of(sim, "al01") == []


@pytest.mark.parametrize(
    "why", ["no CBT support", "CBT turned on by the take", "no DiskRandomRead"]
)
def test_a_full_reads_the_whole_disk_where_the_allocated_areas_cannot_be_asked(
    sim: Sim, why: str
) -> None:
    create_vm(sim.port, "al02", [SIZE])
    write_data(sim.port, "al02")
    if why == "no CBT support":
        cbt(sim.port, "al02", supported=False)
    elif why == "no DiskRandomRead":
        enable_cbt(sim.port, "al02", PASSWORD)
        cbt(sim.port, disk_random_read=False)
    at_take = disk_path(sim.root, "al02", 0).read_bytes()
    driver = VmwareDriver(sim.settings)
    sid = new_snapshot_id()
    primary = driver.take(volume=volume("al02", "al02"), snapshot_id=sid)
    reader = driver.open_reader(primary, BackupPlan(reason="the volume's first backup"))
    try:
        assert [(e.start, e.length) for e in reader.data_extents()] == [(0, SIZE)]
        assert read_whole(reader) == at_take
    finally:
        reader.close()
    driver.release(volume=volume("al02", "al02"), snapshot_id=sid, source=primary)
    assert snapshots_of(sim, "al02") == []


def test_without_disk_random_read_a_delta_reader_names_the_privilege(sim: Sim) -> None:
    create_vm(sim.port, "al03", [64 * MIB])
    enable_cbt(sim.port, "al03", PASSWORD)
    driver = VmwareDriver(sim.settings)
    first_sid, sid, parent = new_snapshot_id(), new_snapshot_id(), new_snapshot_id()
    first = driver.take(volume=volume("al03", "al03"), snapshot_id=first_sid)
    guest_write(sim.port, "al03", MIB, b"\x33" * MIB)
    second = driver.take(volume=volume("al03", "al03"), snapshot_id=sid)
    plan = driver.plan_backup(second, [_Entry(parent, first.change_id)])
    assert plan.parent == parent
    cbt(sim.port, disk_random_read=False)
    with pytest.raises(SourceGone, match=PRIVILEGE):
        driver.open_reader(second, plan)
    for s, p in ((first_sid, first), (sid, second)):
        driver.release(volume=volume("al03", "al03"), snapshot_id=s, source=p)


async def test_backups_of_a_thin_disk_cost_its_data_and_fall_back_without_the_privilege(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """Through the workflows, CBT on: the first full copies the data written, not the
    disk's 256 MiB, and restores exactly; with DiskRandomRead taken away, the backup that
    would be a delta is a full of the whole disk whose reason names the privilege, and
    restores exactly too."""
    create_vm(vsphere.port, "al04", [SIZE])
    enable_cbt(vsphere.port, "al04")
    written = write_data(vsphere.port, "al04")
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        first, at_first = await backed_up(client, vsphere, "al04", host_name)
        assert first.backup is not None and first.backup.kind == "full"
        assert written <= first.backup.bytes_copied <= written + 4096 * len(DATA), first.backup
        assert restores_to(first, at_first)
        scatter(vsphere, "al04", salt=3)
        cbt(vsphere.port, disk_random_read=False)
        third, at_third = await backed_up(client, vsphere, "al04", host_name)
    assert third.state == SnapshotState.BACKED_UP and third.backup is not None
    assert third.backup.kind == "full", third.backup
    assert PRIVILEGE in (third.backup.full_reason or ""), third.backup.full_reason
    assert third.backup.bytes_copied == SIZE
    assert restores_to(third, at_third)
    assert snapshots_of(vsphere, "al04") == []


def test_without_datastore_file_access_the_read_names_the_privileges(
    sim: Sim, tmp_path: Path
) -> None:
    """The backup reads the clone's flat disk over /folder, which needs Datastore.Browse and
    Datastore.FileManagement: answered 403 without them, the read fails for good
    (PermissionDenied, not retried) naming both, and so does a revert's upload; the disk is
    left as it was."""
    create_vm(sim.port, "al05", [4 * MIB], power="poweredOff")
    with open(disk_path(sim.root, "al05", 0), "r+b") as f:  # what the stopped guest left
        f.write(b"\x5a" * MIB)
    driver = VmwareDriver(sim.settings)
    sid = new_snapshot_id()
    primary = driver.take(volume=volume("al05", "al05"), snapshot_id=sid)
    manifest = back_up(
        driver, SecondaryStore(tmp_path / "secondary"), volume("al05", "al05"), sid, primary
    )
    driver.release(volume=volume("al05", "al05"), snapshot_id=sid, source=primary)
    second = new_snapshot_id()
    primary = driver.take(volume=volume("al05", "al05"), snapshot_id=second)
    set_file_access(sim.port, False)
    reader = driver.open_reader(primary, BackupPlan())
    try:
        extent = next(iter(reader.data_extents()))
        with pytest.raises(PermissionDenied, match="Datastore.FileManagement"):
            reader.read_range(extent, 0, memoryview(bytearray(MIB)))
    finally:
        reader.close()
    set_file_access(sim.port, True)
    driver.release(volume=volume("al05", "al05"), snapshot_id=second, source=primary)
    set_file_access(sim.port, False)
    before = disk_path(sim.root, "al05", 0).read_bytes()
    revert = RevertRequest(
        snapshot_id=sid, volume=volume("al05", "al05"), primary=None, manifest_path=manifest
    )
    with pytest.raises(PermissionDenied, match="Datastore.FileManagement"):
        driver.revert(revert)
    assert disk_path(sim.root, "al05", 0).read_bytes() == before
