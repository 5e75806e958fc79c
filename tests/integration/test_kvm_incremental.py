"""KVM incremental backups, on real libvirtd/QEMU: keep one layer.

The newest backed-up snapshot's overlay stays in the chain as the next delta's base; the next
snapshot's frozen image then holds, above the base's frozen image, exactly the clusters the
guest wrote since, and ``qemu-img map`` says which. Every test compares restored bytes (the
full plus each delta, through :meth:`SecondaryStore.materialized`) with the disk's bytes at
snapshot time, kept in a raw reference the test patches as the guest writes.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
from pathlib import Path

import libvirt
import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    SnapshotRecord,
    SnapshotState,
    VmRef,
    VmSnapshotRequest,
    VmSnapshotType,
    new_snapshot_id,
)
from snapferry.activities.settings import Settings
from snapferry.activities.storage.secondary import SecondaryStore
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from snapferry.workflows.snapshot import DELETE_UPDATE, REVERT_UPDATE
from snapferry.workflows.vm_snapshot import DELETE_VM_SNAPSHOT_UPDATE

from ..conftest import snapferry_cli
from .helpers import chain_of, disk_source, images_identical, patch_reference, request_for
from .test_durability import start_backup_worker, stop_workers, wait_for_progress

pytestmark = pytest.mark.integration

CLUSTER = 64 * 1024  # the overlays' qcow2 cluster: the delta's granularity


async def backed_up(
    client: Client, vm_name: str, host: str, settings: Settings, **options: object
) -> SnapshotRecord:
    req = request_for(vm_name, host, settings)
    req.backup = req.backup.model_copy(update=options)
    answer = await starter.create_snapshot(client, req)
    record = await starter.wait_settled(client, answer.id)
    assert record.state == SnapshotState.BACKED_UP and record.backup is not None, record
    return record


def restores_to(record: SnapshotRecord, expected: Path) -> bool:
    """The backup, rebuilt from its chain on secondary, equals ``expected`` byte for byte."""
    assert record.backup is not None
    manifest = SecondaryStore.read_manifest(Path(record.backup.manifest_path))
    with SecondaryStore.materialized(manifest) as raw:
        return images_identical(expected, raw)


def stored_bytes(record: SnapshotRecord) -> int:
    """What the backup's file takes on secondary, from the file system itself."""
    assert record.backup is not None
    return os.stat(record.backup.path).st_blocks * 512


class Disk:
    """The guest's writes, applied both through the VM and to a raw reference."""

    def __init__(self, vm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        self.vm = vm
        self.now = tmp_path / "now.raw"
        shutil.copyfile(vm.reference, self.now)
        self.tmp_path = tmp_path

    def write(self, pattern: int, offset: int, length: int) -> None:
        self.vm.guest_write(pattern=pattern, offset=offset, length=length)
        patch_reference(self.now, self.now, pattern=pattern, offset=offset, length=length)

    def keep(self, name: str) -> Path:
        """The disk's bytes now, for a snapshot taken now."""
        return Path(shutil.copyfile(self.now, self.tmp_path / f"{name}.raw"))

    def reset_to(self, content: Path) -> None:
        shutil.copyfile(content, self.now)


def assert_back_on_the_original_file(vm, disk: Disk, settings: Settings, conn) -> None:  # type: ignore[no-untyped-def]
    """Every snapshot deleted: the VM on its original file, holding the guest's bytes, and
    no layer, marker or backup left behind."""
    assert disk_source(conn, vm.name) == str(vm.disk)
    assert images_identical(disk.now, vm.disk, fmt_b="qcow2")
    assert [p.name for p in vm.disk.parent.glob(vm.disk.name + ".snapferry-*")] == []
    assert list((settings.secondary / "snapshots" / vm.name / "vda").glob("*")) == []


async def test_a_one_percent_change_costs_about_one_percent_and_restores_exactly(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    host_name: str,
    libvirt_conn,
    tmp_path,
) -> None:
    size = 64 * MIB
    vm = make_vm(size=size, data_bytes=size)
    disk = Disk(vm, tmp_path)
    full = await backed_up(client, vm.name, host_name, settings)
    assert full.backup is not None and full.backup.kind == "full"
    assert full.backup.full_reason == "the volume's first backup"
    at_full = disk.keep("full")

    rng = random.Random(14)
    clusters = rng.sample(range(size // CLUSTER), size // CLUSTER // 100)  # 1 % of the disk
    for n in clusters:
        disk.write(rng.randrange(1, 256), n * CLUSTER, CLUSTER)
    delta = await backed_up(client, vm.name, host_name, settings)
    assert delta.backup is not None and delta.backup.kind == "delta"
    assert (delta.backup.parent, delta.backup.depth) == (full.id, 1)
    ratio = stored_bytes(delta) / stored_bytes(full)
    print(f"\ndelta stores {stored_bytes(delta)} bytes, the full {stored_bytes(full)}: {ratio:.2%}")
    assert ratio <= 0.03
    assert restores_to(delta, disk.now) and restores_to(full, at_full)

    # One layer is kept (the delta's base); the full's was merged away under the running VM.
    active = disk_source(libvirt_conn, vm.name)
    assert chain_of(active) == [active, str(vm.disk)]
    assert Path(active + ".base").exists()

    # The full is needed by the delta: its delete hides it. The delta's delete then purges
    # both, gives the kept layer back, and the VM is on its original file again.
    hidden = await starter.snapshot_operation(client, full.id, DELETE_UPDATE)
    assert hidden.state == SnapshotState.HIDDEN
    await starter.snapshot_operation(client, delta.id, DELETE_UPDATE)
    assert (await starter.get_record(client, full.id)).state == SnapshotState.DESTROYED
    assert_back_on_the_original_file(vm, disk, settings, libvirt_conn)


async def test_a_chain_of_five_deltas_across_stop_start_vm_snapshots_a_revert_and_a_delete(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    host_name: str,
    libvirt_conn,
    tmp_path,
) -> None:
    vm = make_vm(size=16 * MIB, data_bytes=8 * MIB)
    dom = libvirt_conn.lookupByName(vm.name)
    disk = Disk(vm, tmp_path)
    points: dict[str, Path] = {}

    async def snapshot(name: str) -> SnapshotRecord:
        record = await backed_up(client, vm.name, host_name, settings)
        points[record.id] = disk.keep(name)
        return record

    async def vm_snapshot(kind: VmSnapshotType) -> str:
        req = VmSnapshotRequest(
            snapshot_id=new_snapshot_id(), vm=VmRef(name=vm.name, host=host_name), type=kind
        )
        return (await starter.create_vm_snapshot(client, req)).id

    s0 = await snapshot("s0")
    disk.write(0x11, 0, MIB)
    s1 = await snapshot("s1")
    v1 = await vm_snapshot(VmSnapshotType.DISK_AND_MEMORY)
    disk.write(0x22, 2 * MIB, MIB)
    dom.destroy()  # stopped: the take and the merges run offline
    s2 = await snapshot("s2")
    dom.create()
    v2 = await vm_snapshot(VmSnapshotType.DISK)
    disk.write(0x33, 4 * MIB, 512 * 1024)
    s3 = await snapshot("s3")
    dom.destroy()
    await starter.snapshot_operation(client, s1.id, REVERT_UPDATE)  # back to s1, stopped
    disk.reset_to(points[s1.id])
    dom.create()
    disk.write(0x44, 6 * MIB, 256 * 1024)
    s4 = await snapshot("s4")  # a delta against s3's backup, of a disk reverted to s1
    hidden = await starter.snapshot_operation(client, s2.id, DELETE_UPDATE)  # in the middle
    assert hidden.state == SnapshotState.HIDDEN  # s3 needs its backup
    disk.write(0x55, 8 * MIB, 128 * 1024)
    s5 = await snapshot("s5")

    chain = [s0, s1, s2, s3, s4, s5]
    for record, parent in zip(chain[1:], chain[:-1], strict=True):
        assert record.backup is not None and record.backup.parent == parent.id, record.backup
    assert s0.backup is not None and s0.backup.parent is None
    for record in [s0, s1, s3, s4, s5]:
        assert restores_to(record, points[record.id]), record.id
    assert images_identical(disk.now, disk_source(libvirt_conn, vm.name), fmt_b="qcow2")

    # Everything deleted, in any order: back on the original file, nothing left anywhere.
    for sid in (v1, v2):
        await starter.snapshot_operation(
            client,
            sid,
            DELETE_VM_SNAPSHOT_UPDATE,
            kind=starter.VM,
            result_type=starter.VM.record_type,
        )
    for record in (s3, s0, s5, s1, s4):
        await starter.snapshot_operation(client, record.id, DELETE_UPDATE)
    assert_back_on_the_original_file(vm, disk, settings, libvirt_conn)


async def test_rollover_a_full_on_request_and_a_lost_base_each_say_why(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    host_name: str,
    libvirt_conn,
    tmp_path,
) -> None:
    vm = make_vm(size=8 * MIB, data_bytes=4 * MIB)
    disk = Disk(vm, tmp_path)
    kinds = []
    for n in range(4):  # a policy's own delta max of 2: full, delta, delta, full
        disk.write(0x10 + n, n * MIB, CLUSTER)
        record = await backed_up(client, vm.name, host_name, settings, delta_max=2)
        assert record.backup is not None and restores_to(record, disk.now)
        kinds.append((record.backup.kind, record.backup.depth, record.backup.full_reason))
    assert kinds[:3] == [
        ("full", 0, "the volume's first backup"),
        ("delta", 1, None),
        ("delta", 2, None),
    ]
    assert kinds[3] == ("full", 0, "2 deltas since the last full (delta max 2)")

    # --full from the CLI, and what show and list --chain say of it.
    made = await snapferry_cli(
        *("snapshot", "create", "--vm", vm.name, "--disk", "vda", "--host", host_name),
        *("--full", "--json"),
    )
    assert made.returncode == 0, made.stderr
    sid = SnapshotRecord.model_validate_json(made.stdout).id
    forced = await starter.wait_settled(client, sid)
    assert forced.backup is not None and forced.backup.kind == "full"
    assert forced.backup.full_reason == "a full backup was asked for (--full)"
    shown = await snapferry_cli("snapshot", "show", sid)
    assert (
        "kind:    full" in shown.stdout and "full because a full backup was asked" in shown.stdout
    )
    listed = await snapferry_cli("snapshot", "list", "--vm", vm.name, "--chain")
    assert listed.stdout.count("    delta of ") == 2 and listed.stdout.count("    full, ") == 3

    # The base snapshot deleted: its layer goes with it, and the next backup is a full.
    newest = await backed_up(client, vm.name, host_name, settings)
    assert newest.backup is not None and newest.backup.kind == "delta"
    await starter.snapshot_operation(client, newest.id, DELETE_UPDATE)
    disk.write(0x77, 6 * MIB, CLUSTER)
    after_delete = await backed_up(client, vm.name, host_name, settings)
    assert after_delete.backup is not None and after_delete.backup.kind == "full"
    reason = after_delete.backup.full_reason
    assert reason is not None and "change tracking lost" in reason and "deleted" in reason
    assert restores_to(after_delete, disk.now)

    # Change tracking lost: the kept layer merged away by hand (an operator's blockcommit).
    dom = libvirt_conn.lookupByName(vm.name)
    kept = disk_source(libvirt_conn, vm.name)
    dom.blockCommit("vda", None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
    for _ in range(500):
        info = dom.blockJobInfo("vda", 0)
        if info and info["cur"] == info["end"]:
            break
        await asyncio.sleep(0.02)
    dom.blockJobAbort("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    assert disk_source(libvirt_conn, vm.name) == str(vm.disk) != kept
    disk.write(0x99, 5 * MIB, CLUSTER)
    after = await backed_up(client, vm.name, host_name, settings)
    assert after.backup is not None and after.backup.kind == "full"
    assert (
        after.backup.full_reason is not None and "change tracking lost" in after.backup.full_reason
    )
    assert restores_to(after, disk.now)


async def test_kill_9_during_a_delta_resumes_against_the_same_base(
    client: Client, settings: Settings, make_vm, host_name: str, tmp_path: Path, monkeypatch
) -> None:
    size = 192 * MIB
    vm = make_vm(size=size, data_bytes=size)
    disk = Disk(vm, tmp_path)
    monkeypatch.setenv("SNAPFERRY_CHECKPOINT_BYTES", str(16 * MIB))  # for the worker processes
    worker_a = worker_b = None
    async with running_workers(client, settings, hosts=[host_name], backup=True):
        full = await backed_up(client, vm.name, host_name, settings)
    at_full = disk.keep("full")
    try:
        async with running_workers(client, settings, hosts=[host_name]):  # backups: A, then B
            disk.write(0x5A, 32 * MIB, 128 * MIB)  # a delta of 128 MiB, copied at 40 MB/s
            worker_a = start_backup_worker(tmp_path / "worker-a.log", rate_mbps=40)
            answer = await starter.create_snapshot(
                client, request_for(vm.name, host_name, settings)
            )
            await wait_for_progress(client, answer.id, 0.5)
            os.kill(worker_a.pid, signal.SIGKILL)
            worker_a.wait()
            worker_b = start_backup_worker(tmp_path / "worker-b.log", rate_mbps=1000)
            record = await asyncio.wait_for(starter.wait_settled(client, answer.id), 120)
    finally:
        stop_workers(worker_a, worker_b)
    assert record.state == SnapshotState.BACKED_UP and record.backup is not None
    backup = record.backup
    assert (backup.kind, backup.parent) == ("delta", full.id)
    assert backup.attempts >= 2 and backup.resumed_from > 0
    assert restores_to(record, disk.now) and restores_to(full, at_full)
    print(f"\nkill -9 mid-delta: resumed from {backup.resumed_from / MIB:.0f} MiB")


@pytest.mark.kvm_full_backups
async def test_incrementals_off_back_up_in_full_and_merge_back(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str, libvirt_conn
) -> None:
    """SNAPFERRY_KVM_INCREMENTAL=0: every backup is a full one, and says so."""
    vm = make_vm(size=4 * MIB, data_bytes=MIB)
    assert settings.kvm_incremental is False  # the marker turned them off
    for _ in range(2):
        record = await backed_up(client, vm.name, host_name, settings)
        assert record.backup is not None and record.backup.kind == "full"
        assert record.backup.full_reason is not None and "off" in record.backup.full_reason
    assert disk_source(libvirt_conn, vm.name) == str(vm.disk)
