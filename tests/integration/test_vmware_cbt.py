"""VMware incrementals with Changed Block Tracking, against tests/vsphere_sim (its CBT model
is tests/vsphere_sim/cbt.py): real pyvmomi, real workflows and copy engine.

- A second backup after a few scattered writes is a delta that copies those ranges only,
  and restores (full + delta) byte-identical to the disk at its snapshot.
- A CBT reset between two backups, or one while a delta is being planned (the
  QueryChangedDiskAreas FileFault), gives a full that says why.
- A VM without CBT support gets fulls that say why.
- After a revert to a VM snapshot, or of a volume from its backup, the next backup is a full.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim
from temporalio.client import Client

from snapferry.activities.contracts import (
    BackupPlan,
    SnapshotRecord,
    SnapshotState,
    VmRef,
    VmSnapshotOperation,
    VmSnapshotType,
    new_snapshot_id,
)
from snapferry.activities.errors import SnapferryError, SourceGone
from snapferry.activities.hypervisors.vmware import VmwareDriver
from snapferry.activities.storage.secondary import SecondaryStore
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from tests.vsphere_sim.control import cbt, create_vm, guest_write, list_vms, soap_calls

from ..conftest import VSPHERE_PASSWORD, Vsphere
from .test_vmware import power, vmware_request
from .test_vmware_clones import volume
from .test_vmware_disk_copy import PASSWORD, USER, Sim, sim

__all__ = ["sim"]

pytestmark = pytest.mark.integration

SIZE = 64 * MIB
# Scattered guest writes: (offset, length), 512-byte aligned as a guest's sectors are.
WRITES = [(0, 4096), (3 * MIB + 512, 70_144), (17 * MIB, MIB), (40 * MIB - 8192, 16_384)]
WRITES += [(SIZE - 65_536, 65_536)]


def seed(vsphere: Vsphere, vm: str) -> None:
    """Random data over the first quarter of the disk, written by the guest."""
    rng = random.Random(7)
    for offset in range(0, SIZE // 4, 2 * MIB):
        guest_write(vsphere.port, vm, offset, rng.randbytes(2 * MIB))


def scatter(vsphere: Vsphere, vm: str, salt: int) -> int:
    """The guest writes WRITES (random bytes); returns how many bytes it wrote."""
    rng = random.Random(salt)
    for offset, length in WRITES:
        guest_write(vsphere.port, vm, offset, rng.randbytes(length))
    return sum(n for _, n in WRITES)


async def backed_up(
    client: Client, vsphere: Vsphere, vm: str, host: str
) -> tuple[SnapshotRecord, bytes]:
    """A volume snapshot of ``vm``, backed up; and the disk's bytes at its take."""
    answer = await starter.create_snapshot(client, vmware_request(vm, vm, host, vsphere))
    at_take = vsphere.disk(vm).read_bytes()  # the guest does not write until it settles
    record = await starter.wait_settled(client, answer.id)
    assert record.state == SnapshotState.BACKED_UP and record.backup is not None, record
    return record, at_take


def restores_to(record: SnapshotRecord, expected: bytes) -> bool:
    """The backup, rebuilt from its chain on secondary, equals ``expected`` byte for byte."""
    assert record.backup is not None
    manifest = SecondaryStore.read_manifest(Path(record.backup.manifest_path))
    with SecondaryStore.materialized(manifest) as raw:
        return Path(raw).read_bytes() == expected


def snapshots_of(vsphere: Vsphere, vm: str) -> list[str]:
    return next(v for v in list_vms(vsphere.port) if v["name"] == vm)["snapshots"]


def enable_cbt(port: int, vm: str, password: str = VSPHERE_PASSWORD) -> None:
    """CBT turned on before snapferry's first take, as an operator does it (KB 1031873):
    ReconfigVM_Task with changeTrackingEnabled on the powered-off VM, then power on."""
    si = SmartConnect(protocol="http", host="127.0.0.1", port=port, user=USER, pwd=password)

    def run(task: vim.Task) -> None:
        while task.info.state not in ("success", "error"):
            time.sleep(0.02)
        assert task.info.state == "success", task.info.error

    try:
        target = si.RetrieveContent().searchIndex.FindByInventoryPath(f"dc1/vm/{vm}")
        run(target.PowerOffVM_Task())
        run(target.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
        run(target.PowerOnVM_Task())
        assert target.config.changeTrackingEnabled
    finally:
        Disconnect(si)


async def test_a_second_backup_is_a_delta_of_the_changed_ranges_and_restores_exactly(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """The first take turns CBT on (its snapshot is the stun/unstun that starts it), so the
    second take is the first with a changeId, and both are backed up in full, saying why.
    After scattered writes, the third backup asks QueryChangedDiskAreas (paged: 8 MiB of
    disk per answer here) and copies those ranges only. Each restores to the disk at its
    snapshot, and no vSphere snapshot is left on the VM."""
    create_vm(vsphere.port, "cb01", [SIZE])
    seed(vsphere, "cb01")
    cbt(vsphere.port, page=8 * MIB)
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        first, first_bytes = await backed_up(client, vsphere, "cb01", host_name)
        assert first.backup is not None and first.backup.kind == "full"
        assert first.backup.full_reason == "the volume's first backup"
        assert first.primary is not None and first.primary.change_id is None
        assert cbt(vsphere.port, "cb01")["active"]
        assert snapshots_of(vsphere, "cb01") == []
        guest_write(vsphere.port, "cb01", 20 * MIB, b"\x42" * MIB)
        full, at_full = await backed_up(client, vsphere, "cb01", host_name)
        assert full.backup is not None and full.backup.kind == "full"
        assert "has no CBT changeId" in (full.backup.full_reason or "")
        assert full.primary is not None and full.primary.change_id is not None
        changed = scatter(vsphere, "cb01", salt=1)
        asked = cbt(vsphere.port)["queries"]
        delta, at_delta = await backed_up(client, vsphere, "cb01", host_name)
    assert delta.backup is not None and delta.backup.kind == "delta", delta.backup
    assert (delta.backup.parent, delta.backup.depth) == (full.id, 1)
    assert changed <= delta.backup.bytes_copied <= changed + 4096
    # The full read the allocated areas only ("*"): the seeded quarter and the MiB at 20.
    assert full.backup.bytes_copied == SIZE // 4 + MIB
    assert cbt(vsphere.port)["queries"] - asked == SIZE // (8 * MIB)  # the whole disk, paged
    assert restores_to(delta, at_delta) and restores_to(full, at_full)
    assert at_delta != at_full
    assert snapshots_of(vsphere, "cb01") == []  # the kept snapshot went at release
    assert soap_calls(vsphere.port).get("ReconfigVM_Task") == 1  # enabled once
    assert restores_to(first, first_bytes)


async def test_a_cbt_reset_between_backups_gives_a_full_that_says_why(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """CBT is reset (new tracking UUIDs: CBT turned off and on, its -ctk files lost) after the first
    backup: the next changeId is of another tracking, so the next backup is a full."""
    create_vm(vsphere.port, "cb02", [SIZE])
    enable_cbt(vsphere.port, "cb02")
    seed(vsphere, "cb02")
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        await backed_up(client, vsphere, "cb02", host_name)
        scatter(vsphere, "cb02", salt=2)
        cbt(vsphere.port, "cb02", reset=True)
        after, at_take = await backed_up(client, vsphere, "cb02", host_name)
        scatter(vsphere, "cb02", salt=3)
        delta, at_delta = await backed_up(client, vsphere, "cb02", host_name)
    assert after.backup is not None and after.backup.kind == "full"
    assert after.backup.full_reason is not None and "reset" in after.backup.full_reason
    assert restores_to(after, at_take)
    assert delta.backup is not None and delta.backup.kind == "delta"  # tracking again
    assert delta.backup.parent == after.id and restores_to(delta, at_delta)


async def test_a_reset_while_the_delta_is_read_falls_back_to_a_full_that_says_why(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """CBT is reset after the take and before its backup: QueryChangedDiskAreas answers
    FileFault for the parent's changeId, the reader raises SourceGone, and the backup
    activity plans a full instead, with the reason."""
    create_vm(vsphere.port, "cb03", [SIZE])
    enable_cbt(vsphere.port, "cb03")
    seed(vsphere, "cb03")
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        await backed_up(client, vsphere, "cb03", host_name)
        scatter(vsphere, "cb03", salt=4)
    async with running_workers(client, vsphere.settings, hosts=[host_name]):
        answer = await starter.create_snapshot(
            client, vmware_request("cb03", "cb03", host_name, vsphere)
        )
        at_take = vsphere.disk("cb03").read_bytes()
        assert answer.state == SnapshotState.CREATED_ON_PRIMARY
    assert snapshots_of(vsphere, "cb03") != []  # kept for QueryChangedDiskAreas
    cbt(vsphere.port, "cb03", reset=True)
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        record = await starter.wait_settled(client, answer.id)
    assert record.state == SnapshotState.BACKED_UP and record.backup is not None
    assert record.backup.kind == "full", record.backup
    reason = record.backup.full_reason or ""
    assert "the delta base went" in reason and "cannot list the changes" in reason, reason
    assert restores_to(record, at_take)
    assert snapshots_of(vsphere, "cb03") == []


async def test_a_vm_without_cbt_support_gets_fulls_that_say_why(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """capability.changeTrackingSupported is false (below virtual hardware 7): no
    ReconfigVM_Task, no snapshot kept, and every backup a full with the reason."""
    create_vm(vsphere.port, "cb04", [SIZE])
    cbt(vsphere.port, "cb04", supported=False)
    seed(vsphere, "cb04")
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        await backed_up(client, vsphere, "cb04", host_name)
        scatter(vsphere, "cb04", salt=5)
        second, at_take = await backed_up(client, vsphere, "cb04", host_name)
    assert second.backup is not None and second.backup.kind == "full"
    reason = second.backup.full_reason or ""
    assert "Changed Block Tracking was not on" in reason, reason
    assert restores_to(second, at_take)
    assert not soap_calls(vsphere.port).get("ReconfigVM_Task")
    assert not cbt(vsphere.port, "cb04")["active"]


async def test_after_a_vm_snapshot_revert_the_next_backup_is_a_full(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """Backups with CBT, a VM snapshot, writes and a backup after it, then a revert to the
    VM snapshot: the changeIds handed out after it name other disk states now (the
    simulator answers them without a fault, as vSphere 6.5 and later do), so a delta
    against the newest backup would miss what the revert changed. The revert turns CBT
    off; the next backup is a full with the reason, and restores to the reverted disk."""
    create_vm(vsphere.port, "cb05", [SIZE])
    enable_cbt(vsphere.port, "cb05")
    seed(vsphere, "cb05")
    driver = VmwareDriver(vsphere.settings)
    ref = VmRef(name="cb05", host=host_name, hypervisor="vmware")
    op = VmSnapshotOperation(snapshot_id=new_snapshot_id(), vm=ref, type=VmSnapshotType.DISK)
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        await backed_up(client, vsphere, "cb05", host_name)
        scatter(vsphere, "cb05", salt=6)
        await backed_up(client, vsphere, "cb05", host_name)  # CBT on from here
        driver.take_vm_snapshot(op)
        scatter(vsphere, "cb05", salt=7)
        guest_write(vsphere.port, "cb05", 30 * MIB, b"\x77" * MIB)
        newest, _ = await backed_up(client, vsphere, "cb05", host_name)
        assert newest.backup is not None and newest.backup.kind == "delta"
        power(vsphere, "cb05", False)
        driver.revert_vm_snapshot(op)
        power(vsphere, "cb05", True)
        after, at_take = await backed_up(client, vsphere, "cb05", host_name)
    assert after.backup is not None and after.backup.kind == "full", after.backup
    assert "Changed Block Tracking was not on" in (after.backup.full_reason or "")
    assert restores_to(after, at_take)


async def test_after_a_volume_revert_the_next_backup_is_a_full(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """A volume reverted from its backup is written over the datastore, past CBT: the
    revert resets CBT, and the next backup is a full that says so."""
    from snapferry.workflows.snapshot import REVERT_UPDATE

    create_vm(vsphere.port, "cb06", [SIZE])
    enable_cbt(vsphere.port, "cb06")
    seed(vsphere, "cb06")
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        first, at_first = await backed_up(client, vsphere, "cb06", host_name)
        scatter(vsphere, "cb06", salt=8)
        second, _ = await backed_up(client, vsphere, "cb06", host_name)
        assert second.backup is not None and second.backup.kind == "delta"
        power(vsphere, "cb06", False)
        await starter.snapshot_operation(client, first.id, REVERT_UPDATE)
        assert vsphere.disk("cb06").read_bytes() == at_first
        power(vsphere, "cb06", True)
        after, at_take = await backed_up(client, vsphere, "cb06", host_name)
    assert after.backup is not None and after.backup.kind == "full", after.backup
    # CBT stays off after the revert (turning it straight back on would not reset the
    # tracking on a real host, VMware KB 2139574): the next take turns it on again.
    assert "Changed Block Tracking was not on" in (after.backup.full_reason or "")
    assert restores_to(after, at_take) and at_take == at_first


async def test_a_revert_that_cannot_turn_cbt_off_is_refused_before_it_writes(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """Without VirtualMachine.Config.ChangeTracking, CBT cannot be turned off: the revert
    is refused with the privilege named and nothing written, since a later incremental
    would miss what the revert rewrote; a VM-snapshot revert likewise, before reverting."""
    from snapferry.workflows.snapshot import REVERT_UPDATE

    create_vm(vsphere.port, "cb09", [SIZE])
    enable_cbt(vsphere.port, "cb09")
    seed(vsphere, "cb09")
    driver = VmwareDriver(vsphere.settings)
    ref = VmRef(name="cb09", host=host_name, hypervisor="vmware")
    op = VmSnapshotOperation(snapshot_id=new_snapshot_id(), vm=ref, type=VmSnapshotType.DISK)
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        first, _ = await backed_up(client, vsphere, "cb09", host_name)
        scatter(vsphere, "cb09", salt=9)
        power(vsphere, "cb09", False)
        before = vsphere.disk("cb09").read_bytes()
        cbt(vsphere.port, change_tracking=False)
        try:
            with pytest.raises(starter.SnapferryClientError, match="ChangeTracking"):
                await starter.snapshot_operation(client, first.id, REVERT_UPDATE)
            assert vsphere.disk("cb09").read_bytes() == before
        finally:
            cbt(vsphere.port, change_tracking=True)
        driver.take_vm_snapshot(op)
        power(vsphere, "cb09", True)
        guest_write(vsphere.port, "cb09", 0, b"\x55" * MIB)
        power(vsphere, "cb09", False)
        after_snapshot = vsphere.disk("cb09").read_bytes()
        cbt(vsphere.port, change_tracking=False)
        try:
            with pytest.raises(SnapferryError, match="ChangeTracking"):
                driver.revert_vm_snapshot(op)
            assert vsphere.disk("cb09").read_bytes() == after_snapshot
        finally:
            cbt(vsphere.port, change_tracking=True)


def test_a_delta_reader_reads_only_the_changed_areas(sim: Sim) -> None:
    """Through the driver alone: the reader of a delta lists the changed areas (merged
    across answers' page ends), sends one GET per area, and reads their bytes; a CBT reset
    after the take makes it raise SourceGone, the error the backup activity turns into a
    full."""
    create_vm(sim.port, "cb07", [SIZE])
    enable_cbt(sim.port, "cb07", PASSWORD)
    cbt(sim.port, page=MIB)
    driver = VmwareDriver(sim.settings)
    first_sid = new_snapshot_id()
    first = driver.take(volume=volume("cb07", "cb07"), snapshot_id=first_sid)
    assert first.change_id is not None
    spans = [(MIB - 4096, 8192), (5 * MIB, 512), (9 * MIB, 3 * MIB)]
    for i, (offset, length) in enumerate(spans):
        guest_write(sim.port, "cb07", offset, bytes([i + 1]) * length)
    sid, parent = new_snapshot_id(), new_snapshot_id()
    second = driver.take(volume=volume("cb07", "cb07"), snapshot_id=sid)
    assert second.change_id is not None and second.change_id != first.change_id
    plan = driver.plan_backup(second, [_Entry(parent, first.change_id)])
    assert plan.parent == parent and plan.base_image == first.change_id
    reader = driver.open_reader(second, plan)
    try:
        extents = [(e.start, e.length) for e in reader.data_extents()]
        assert extents == spans
        for i, e in enumerate(reader.data_extents()):
            buf = bytearray(e.length)
            reader.read_range(e, e.start, memoryview(buf))
            assert bytes(buf) == bytes([i + 1]) * e.length
        assert reader.requests == len(spans)
    finally:
        reader.close()
    cbt(sim.port, "cb07", reset=True)
    with pytest.raises(SourceGone, match="cannot list the changes"):
        driver.open_reader(second, BackupPlan(parent=parent, base_image=first.change_id, depth=1))
    driver.release(volume=volume("cb07", "cb07"), snapshot_id=sid, source=second)
    driver.release(volume=volume("cb07", "cb07"), snapshot_id=first_sid, source=first)
    assert sim.vm("cb07")["snapshots"] == []


def test_an_invalid_argument_from_the_delta_query_is_source_gone(sim: Sim) -> None:
    """QueryChangedDiskAreas of a delta answered InvalidArgument (a real vCenter 7.0U3:
    "A specified parameter was not correct: startOffset" while CBT was not active,
    github.com/vexxhost/migratekit/issues/24; a runtime fault, vmodl.fault.InvalidArgument):
    the same query would fail again, so the reader raises SourceGone naming the fault, and the
    backup becomes a full, as for FileFault or NotFound, not a transient error retried."""
    create_vm(sim.port, "cb10", [SIZE])
    enable_cbt(sim.port, "cb10", PASSWORD)
    driver = VmwareDriver(sim.settings)
    first_sid, sid, parent = new_snapshot_id(), new_snapshot_id(), new_snapshot_id()
    first = driver.take(volume=volume("cb10", "cb10"), snapshot_id=first_sid)
    guest_write(sim.port, "cb10", MIB, b"\x11" * 4096)
    second = driver.take(volume=volume("cb10", "cb10"), snapshot_id=sid)
    assert first.change_id is not None and second.change_id is not None
    plan = driver.plan_backup(second, [_Entry(parent, first.change_id)])
    assert plan.parent == parent
    cbt(sim.port, invalid_argument="startOffset")
    with pytest.raises(SourceGone, match="InvalidArgument.*startOffset"):
        driver.open_reader(second, plan)
    driver.release(volume=volume("cb10", "cb10"), snapshot_id=sid, source=second)
    driver.release(volume=volume("cb10", "cb10"), snapshot_id=first_sid, source=first)


class _Entry:
    """A finished backup as plan_backup reads it (BackupHistoryEntry)."""

    def __init__(
        self, snapshot_id: str, change_id: str | None, depth: int = 0, virtual_size: int = SIZE
    ) -> None:
        self.snapshot_id, self.change_id, self.depth = snapshot_id, change_id, depth
        self.source, self.virtual_size = "[ds1] x/x-flat.vmdk", virtual_size
