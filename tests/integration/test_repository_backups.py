"""Backups into the backup repository, on real libvirtd/QEMU and the real Temporal server:
every backup whole, incrementals small, dedup across VMs, encryption at rest, resume after
kill -9, restores and reverts from it, deletes that touch one backup only."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import SnapshotRecord, SnapshotState
from snapferry.activities.settings import Settings
from snapferry.activities.storage.backup_image import backup_image
from snapferry.activities.storage.repository import Repository, create_key_file, jobs
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from snapferry.workflows.snapshot import DELETE_UPDATE

from ..conftest import snapferry_cli
from .helpers import images_identical, request_for
from .test_durability import start_backup_worker, stop_workers, wait_for_progress
from .test_kvm_incremental import CLUSTER, Disk, backed_up

pytestmark = [pytest.mark.integration, pytest.mark.backup_store("repository")]


def restores_to(record: SnapshotRecord, expected: Path) -> bool:
    assert record.backup is not None
    with backup_image(record.backup.manifest_path) as raw:
        return images_identical(expected, raw)


def pack_bytes(settings: Settings) -> int:
    packs = settings.repository / "packs"
    return sum(p.stat().st_size for p in packs.glob("*/*.pack"))


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


async def test_incrementals_are_small_every_backup_whole_and_nothing_in_plaintext(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    host_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = create_key_file(tmp_path / "repo.key")
    monkeypatch.setenv("SNAPFERRY_REPOSITORY_KEY_FILE", str(tmp_path / "repo.key"))
    size = 64 * MIB
    vm = make_vm(size=size, data_bytes=size)
    disk = Disk(vm, tmp_path)
    full = await backed_up(client, vm.name, host_name, settings)
    assert full.backup is not None and full.backup.kind == "full"
    backups = settings.repository / "backups" / vm.name / "vda"
    assert Path(full.backup.manifest_path).parent == backups
    manifest = json.loads(Path(full.backup.manifest_path).read_text())
    assert manifest["key_fingerprint"] == key.fingerprint
    assert full.backup.checksum.startswith("sfrepo1:")
    at_full = disk.keep("full")

    rng = random.Random(21)
    clusters = rng.sample(range(size // CLUSTER), size // CLUSTER // 100)  # 1 %, scattered
    for n in clusters:
        disk.write(rng.randrange(1, 256), n * CLUSTER, CLUSTER)
    delta = await backed_up(client, vm.name, host_name, settings)
    assert delta.backup is not None and delta.backup.kind == "delta"
    assert (delta.backup.parent, delta.backup.depth) == (full.id, 1)
    # Read: only what changed. Stored: its new chunks and segments, compressed and sealed.
    assert delta.backup.bytes_copied == len(clusters) * CLUSTER
    ratio = delta.backup.bytes_stored / full.backup.bytes_stored
    print(
        f"\nincremental stores {delta.backup.bytes_stored} bytes, the full's"
        f" {full.backup.bytes_stored}: {ratio:.2%}"
    )
    assert ratio <= 0.03
    assert delta.backup.verify_bytes_read >= delta.backup.bytes_stored * 0.9
    assert restores_to(full, at_full) and restores_to(delta, disk.now)

    # No guest bytes on the store: the disk is random data, so any 4 KiB of it found in a
    # file would be plaintext.
    probe = disk.now.read_bytes()[8 * MIB : 8 * MIB + 4096]
    for path in files_under(settings.repository):
        assert probe not in path.read_bytes(), path

    # Every backup is whole: the full goes at once (no Hidden), the incremental still
    # restores on its own, and a volume made from it is the disk at its snapshot.
    gone = await starter.snapshot_operation(client, full.id, DELETE_UPDATE)
    assert gone.state == SnapshotState.DESTROYED
    assert not Path(full.backup.manifest_path).exists()
    assert restores_to(delta, disk.now)
    made = await snapferry_cli("snapshot", "to-volume", delta.id, "--name", "fromrepo", "--json")
    assert made.returncode == 0, made.stderr
    assert images_identical(disk.now, json.loads(made.stdout)["path"], fmt_b="qcow2")
    verify = await snapferry_cli("backup", "verify", delta.id)
    assert verify.returncode == 0, verify.stderr
    for fmt in ("raw", "qcow2"):
        image = tmp_path / f"export.{fmt}"
        out = await snapferry_cli("snapshot", "export", delta.id, "--format", fmt, str(image))
        assert out.returncode == 0, out.stderr
        assert images_identical(disk.now, image, fmt_b=fmt)
        again = await snapferry_cli("snapshot", "export", delta.id, "--format", fmt, str(image))
        assert again.returncode == 1 and "exists" in again.stderr
    assert os.stat(tmp_path / "export.raw").st_blocks * 512 < 1.1 * size  # sparse
    monkeypatch.delenv("SNAPFERRY_REPOSITORY_KEY_FILE")  # for the CLI process
    gone_key = await snapferry_cli(
        "snapshot", "export", delta.id, "--format", "raw", str(tmp_path / "nokey.raw")
    )
    monkeypatch.setenv("SNAPFERRY_REPOSITORY_KEY_FILE", str(tmp_path / "repo.key"))
    assert gone_key.returncode == 1 and "SNAPFERRY_REPOSITORY_KEY_FILE" in gone_key.stderr
    assert not (tmp_path / "nokey.raw").exists()

    # Once every backup is deleted and gc's grace period (for backups that started before
    # it) has passed, gc gives the space back.
    await starter.snapshot_operation(client, delta.id, DELETE_UPDATE)
    repo = Repository(settings.repository, key)
    jobs.gc(repo, now=time.time() + jobs.SAFETY_S + 1)
    assert pack_bytes(settings) == 0
    assert jobs.status(repo).backups == 0


async def test_a_second_vm_with_the_same_data_adds_almost_nothing(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str
) -> None:
    size = 48 * MIB
    first = make_vm(size=size, data_bytes=size, seed=7)
    second = make_vm(size=size, data_bytes=size, seed=7)
    a = await backed_up(client, first.name, host_name, settings)
    after_first = pack_bytes(settings)
    b = await backed_up(client, second.name, host_name, settings)
    added = pack_bytes(settings) - after_first
    print(f"\nthe first VM stored {after_first} bytes, the second added {added}")
    assert added <= 0.05 * after_first
    assert b.backup is not None and b.backup.bytes_stored <= 0.05 * size
    assert restores_to(a, first.reference) and restores_to(b, second.reference)


async def test_kill_9_backup_worker_resumes_from_the_repository_checkpoint(
    client: Client, settings: Settings, make_vm, host_name: str, tmp_path: Path
) -> None:
    size = 1024 * MIB
    vm = make_vm(size=size, data_bytes=size)  # 1 GiB of random data
    worker_a = start_backup_worker(tmp_path / "worker-a.log", rate_mbps=120)
    worker_b = None
    try:
        async with running_workers(client, settings, hosts=[host_name]):
            answer = await starter.create_snapshot(
                client, request_for(vm.name, host_name, settings)
            )
            await wait_for_progress(client, answer.id, 0.45)
            os.kill(worker_a.pid, signal.SIGKILL)
            worker_a.wait()
            stored_before_crash = pack_bytes(settings)
            worker_b = start_backup_worker(tmp_path / "worker-b.log", rate_mbps=1000)
            record = await asyncio.wait_for(starter.wait_settled(client, answer.id), 180)
    finally:
        stop_workers(worker_a, worker_b)

    assert record.state == SnapshotState.BACKED_UP and record.backup is not None
    backup = record.backup
    assert backup.attempts >= 2 and backup.resumed_from > 0
    assert backup.bytes_copied == size - backup.resumed_from
    assert restores_to(record, vm.reference)
    # What the first attempt made durable is not stored again (its chunks are found in the
    # index); packs it sealed after its last checkpoint hold nothing a backup names. Its
    # writer file pins them while it might still be alive; once that file is stale (and the
    # safety margin past), gc frees them, and only them.
    total = pack_bytes(settings)
    assert total <= size + (stored_before_crash - backup.resumed_from) + 16 * MIB
    repo = Repository(settings.repository)
    while_alive = jobs.gc(repo, now=time.time() + jobs.SAFETY_S + 1)
    assert while_alive.packs_removed == 0 and pack_bytes(settings) == total
    dead = jobs.gc(repo, now=time.time() + jobs.WRITER_STALE_S + jobs.SAFETY_S + 1)
    after_gc = pack_bytes(settings)
    assert dead.bytes_freed == total - after_gc
    assert after_gc <= 1.02 * size, f"{after_gc} bytes stored for {size}"
    assert restores_to(record, vm.reference)
    print(
        f"\nkill -9 with {stored_before_crash / MIB:.0f} MiB stored, resumed from"
        f" {backup.resumed_from / MIB:.0f} MiB; the store holds {total / MIB:.0f} MiB,"
        f" {after_gc / MIB:.0f} MiB after gc"
    )
