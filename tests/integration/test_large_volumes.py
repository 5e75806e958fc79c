"""Large volumes, through the real stack: a thin 256 GiB volume costs what its data
costs, a stalled store delays a backup without failing it, a killed backup worker's backup
moves again within seconds of a new worker, and failures still wait backup.retry.interval.

No wall-clock asserts: the figures are printed, and what is asserted is the engine's own
counters and the order of events (an attempt that started before the retry interval would
have let it)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from snapferry.activities.backup import BackupActivities
from snapferry.activities.contracts import SnapshotRequest, SnapshotState
from snapferry.activities.settings import Settings
from snapferry.activities.storage.copy_engine import writer
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from snapferry.workflows.snapshot import VERIFY_BACKUP_UPDATE

from .helpers import images_identical, request_for
from .test_durability import start_backup_worker, stop_workers, wait_for_progress

pytestmark = pytest.mark.integration

GIB = 1024 * MIB


def with_options(req: SnapshotRequest, **options: float) -> SnapshotRequest:
    req.backup = req.backup.model_copy(update=options)
    return req


def failed_alerts(settings: Settings) -> list[str]:
    if not settings.alert_log.exists():
        return []
    return [line for line in settings.alert_log.read_text().splitlines() if "FAILED" in line]


async def test_a_256_gib_thin_volume_costs_what_its_512_mib_of_data_cost(
    client: Client, settings: Settings, workers: None, make_thin_vm, host_name: str
) -> None:
    size = 256 * GIB
    # 64 runs of 8 MiB (one chunk each), one every 4 GiB, each its own pattern: 512 MiB.
    writes = [(i * 4 * GIB, 8 * MIB, i + 1) for i in range(64)]
    data = sum(length for _, length, _ in writes)
    vm = make_thin_vm(size=size, writes=writes)

    t0 = time.monotonic()
    answer = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
    record = await starter.wait_settled(client, answer.id, timeout=1800)
    took = time.monotonic() - t0
    assert record.state == SnapshotState.BACKED_UP, record.backup_error
    backup = record.backup
    assert backup is not None and backup.virtual_size == size

    # Byte-identical: the backup (raw) against the disk as it was at the snapshot (the
    # guest loops in its BIOS and never writes, so the merged disk still is that).
    assert images_identical(backup.path, vm.disk, fmt_a="raw", fmt_b="qcow2")
    # The engine's own counters: the copy read the data only, and so did the verify.
    assert backup.bytes_copied == data
    assert data <= backup.verify_bytes_read <= data + 64 * settings.chunk_size
    # Sparse on secondary: the data's blocks, not the virtual size.
    assert os.stat(backup.path).st_blocks * 512 < 2 * data

    # `backup verify` (the update, on the backup pool) costs the same, and heartbeats.
    t1 = time.monotonic()
    handle = client.get_workflow_handle(f"volume-snapshot-{answer.id}")
    checked = await handle.execute_update(VERIFY_BACKUP_UPDATE, result_type=str)
    verify_took = time.monotonic() - t1
    assert checked == backup.checksum
    print(
        f"\n256 GiB thin, 512 MiB data: snapshot to BackedUp {took:.1f} s; copy read"
        f" {backup.bytes_copied / MIB:.0f} MiB; verify read"
        f" {backup.verify_bytes_read / MIB:.0f} MiB in {backup.verify_seconds:.2f} s;"
        f" backup verify {verify_took:.1f} s"
    )


async def test_a_store_that_stalls_for_twice_the_heartbeat_timeout_delays_the_backup(
    client: Client,
    settings: Settings,
    make_vm,
    host_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    heartbeat_s = settings.backup_defaults.heartbeat_timeout_s
    stall_s = 2 * heartbeat_s
    stalled = threading.Event()
    real_write = writer.Writer.write

    def write(self, data, offset, *args):  # type: ignore[no-untyped-def]
        # The store hangs once, mid-copy, for twice the heartbeat timeout (an NFS failover).
        if offset >= 48 * MIB and not stalled.is_set():
            stalled.set()
            time.sleep(stall_s)
        return real_write(self, data, offset, *args)

    attempts: list[str] = []
    real_copy = BackupActivities._copy

    def copy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            result = real_copy(self, *args, **kwargs)
        except BaseException as exc:
            attempts.append(type(exc).__name__)
            raise
        attempts.append("done")
        return result

    monkeypatch.setattr(writer.Writer, "write", write)
    monkeypatch.setattr(BackupActivities, "_copy", copy)
    slow = dataclasses.replace(settings, backup_rate_limit_bps=40e6)  # checkpoints before it
    vm = make_vm(size=128 * MIB, data_bytes=128 * MIB)
    async with running_workers(client, slow, hosts=[host_name], backup=True):
        answer = await starter.create_snapshot(client, request_for(vm.name, host_name, slow))
        record = await starter.wait_settled(client, answer.id, timeout=600)

    assert stalled.is_set()
    assert record.state == SnapshotState.BACKED_UP, record.backup_error
    assert record.backup_error is None and failed_alerts(slow) == []
    assert record.backup is not None and vm.reference is not None
    assert images_identical(vm.reference, record.backup.path)
    # The stalled attempt stopped as a stall (retryable), never as a cancel; the next one
    # waited for its lock instead of failing, and resumed from the last checkpoint.
    assert "BackupStalled" in attempts and "BackupCancelled" not in attempts, attempts
    assert attempts[-1] == "done" and record.backup.attempts == 2, (attempts, record.backup)
    assert record.backup.resumed_from > 0
    print(
        f"\nstall of {stall_s:.0f} s: attempts {attempts}, resumed from"
        f" {record.backup.resumed_from / MIB:.0f} MiB"
    )


async def test_kill_9_backup_worker_moves_again_within_seconds_not_the_retry_interval(
    client: Client, settings: Settings, make_vm, host_name: str, tmp_path: Path
) -> None:
    retry_interval_s = 120.0
    size = 1024 * MIB
    vm = make_vm(size=size, data_bytes=size)
    req = with_options(request_for(vm.name, host_name, settings), retry_interval_s=retry_interval_s)
    worker_a = start_backup_worker(tmp_path / "worker-a.log", rate_mbps=100)
    worker_b = None
    try:
        async with running_workers(client, settings, hosts=[host_name]):
            answer = await starter.create_snapshot(client, req)
            await wait_for_progress(client, answer.id, 0.3)
            os.kill(worker_a.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            worker_a.wait()
            worker_b = start_backup_worker(tmp_path / "worker-b.log", rate_mbps=1000)
            b_started = time.monotonic()
            moving_at = None
            record = await starter.get_record(client, answer.id)
            # Until the backup is moving again, on its second attempt; at the latest one
            # retry interval after the kill, which is when the old policy would retry.
            while time.monotonic() - killed_at < retry_interval_s:
                record = await starter.get_record(client, answer.id)
                if record.state == SnapshotState.BACKED_UP:
                    moving_at = time.monotonic()
                    break
                progress = await starter.backup_progress(client, record)
                if progress is not None and progress.attempt >= 2:
                    moving_at = time.monotonic()
                    break
                await asyncio.sleep(0.1)
            assert moving_at is not None, "the backup waited the retry interval after a crash"
            record = await starter.wait_settled(client, answer.id, timeout=600)
    finally:
        stop_workers(worker_a, worker_b)

    assert record.state == SnapshotState.BACKED_UP and record.backup is not None
    assert vm.reference is not None and images_identical(vm.reference, record.backup.path)
    assert record.backup.attempts >= 2 and record.backup.resumed_from > 0
    # The order of events in the backup's history: the attempt that finished started after
    # a heartbeat timeout (the crash), not after a failure.
    history = client.get_workflow_handle(record.backup_workflow_id or f"backup-{answer.id}-1")
    started = [
        e.activity_task_started_event_attributes
        async for e in history.fetch_history_events()
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    ]
    assert started and started[-1].attempt >= 2
    assert started[-1].last_failure.HasField("timeout_failure_info"), started[-1].last_failure
    print(
        f"\nkill -9: moving again {moving_at - killed_at:.1f} s after the kill,"
        f" {moving_at - b_started:.1f} s after the new worker started"
        f" (retry interval {retry_interval_s:.0f} s, heartbeat timeout"
        f" {settings.backup_defaults.heartbeat_timeout_s:.0f} s); resumed from"
        f" {record.backup.resumed_from / MIB:.0f} MiB"
    )


async def test_a_failure_still_waits_the_retry_interval_on_the_real_server(
    client: Client, settings: Settings, make_vm, host_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    retry_interval_s = 4.0  # above the 2 s the policy now uses for crashes
    started: list[float] = []
    real_backup = BackupActivities._backup

    async def backup(self, req):  # type: ignore[no-untyped-def]
        started.append(time.monotonic())
        return await real_backup(self, req)

    monkeypatch.setattr(BackupActivities, "_backup", backup)
    vm = make_vm(size=16 * MIB, data_bytes=4 * MIB)
    store_dir = settings.secondary / "snapshots" / vm.name / "vda"
    store_dir.mkdir(parents=True)
    subprocess.run(["chattr", "+i", str(store_dir)], check=True)  # not writable, even by root
    try:
        req = with_options(
            request_for(vm.name, host_name, settings),
            retry_interval_s=retry_interval_s,
            retry_attempts=1,
        )
        async with running_workers(client, settings, hosts=[host_name], backup=True):
            answer = await starter.create_snapshot(client, req)
            record = await starter.wait_settled(client, answer.id, timeout=300)
    finally:
        subprocess.run(["chattr", "-i", str(store_dir)], check=True)
    assert record.state == SnapshotState.CREATED_ON_PRIMARY and record.backup_error
    assert "not writable" in record.backup_error
    assert len(started) == 2
    # The failed attempt asked for backup.retry.interval (next_retry_delay) and got it.
    assert started[1] - started[0] >= retry_interval_s
