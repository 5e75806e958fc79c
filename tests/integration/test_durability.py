"""Durability: a killed backup worker and a restarted Temporal server delay a backup, never
lose it, and a resumed copy repeats little work."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import SnapshotRecord, SnapshotState
from snapferry.activities.settings import Settings
from snapferry.activities.storage import checksum
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.stack import terminate
from snapferry.workers.worker import running_workers

from ..conftest import DevServer
from .helpers import images_identical, request_for

pytestmark = pytest.mark.integration


def start_backup_worker(log: Path, *, rate_mbps: int) -> subprocess.Popen:
    env = dict(os.environ, SNAPFERRY_BACKUP_RATE_LIMIT_MBPS=str(rate_mbps))
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snapferry.workers.cli",
                "worker",
                "--backup",
                "--concurrency",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def stop_workers(*workers: subprocess.Popen | None) -> None:
    """Stop the worker processes a test started and that still run (by PID)."""
    for w in workers:
        if w is not None and w.poll() is None:
            terminate(w.pid)


async def wait_for_progress(client: Client, snapshot_id: str, fraction: float) -> int:
    """Wait until the backup reports at least ``fraction`` done; return bytes done."""
    for _ in range(600):
        record = await starter.get_record(client, snapshot_id)
        progress = await starter.backup_progress(client, record)
        if (
            progress
            and progress.bytes_total
            and progress.bytes_done >= fraction * progress.bytes_total
        ):
            return progress.bytes_done
        await asyncio.sleep(0.1)
    raise AssertionError("the backup made no progress")


def assert_backup_is_the_snapshot(record: SnapshotRecord, reference: Path) -> None:
    assert record.state == SnapshotState.BACKED_UP and record.backup is not None
    chunk_size, _ = checksum.parse_checksum(record.backup.checksum)
    assert checksum.file_checksum(reference, chunk_size)[0] == record.backup.checksum
    assert images_identical(reference, record.backup.path)


async def test_kill_9_backup_worker_resumes_from_checkpoint(
    client: Client, settings: Settings, make_vm, host_name: str, tmp_path: Path
) -> None:
    size = 1024 * MIB
    vm = make_vm(size=size, data_bytes=size)  # 1 GiB of random data
    worker_a = start_backup_worker(tmp_path / "worker-a.log", rate_mbps=150)
    worker_b = None
    try:
        async with running_workers(client, settings, hosts=[host_name]):
            answer = await starter.create_snapshot(
                client, request_for(vm.name, host_name, settings)
            )
            await wait_for_progress(client, answer.id, 0.4)
            os.kill(worker_a.pid, signal.SIGKILL)
            worker_a.wait()
            partial = (
                settings.secondary / "snapshots" / vm.name / "vda" / f"{answer.id}.raw.partial"
            )
            written_before_crash = partial.stat().st_size
            assert 0.3 * size < written_before_crash < size

            worker_b = start_backup_worker(tmp_path / "worker-b.log", rate_mbps=1000)
            record = await asyncio.wait_for(starter.wait_settled(client, answer.id), 120)
    finally:
        stop_workers(worker_a, worker_b)

    assert_backup_is_the_snapshot(record, vm.reference)
    backup = record.backup
    assert backup is not None
    assert backup.attempts >= 2
    assert backup.resumed_from > 0
    # The engine's own counters: the resumed attempt copied only what was left ...
    assert backup.bytes_copied == size - backup.resumed_from
    # ... and what the crash made it copy again is under 25 % of the volume.
    recopied = written_before_crash - backup.resumed_from
    assert recopied < 0.25 * size, f"re-copied {recopied / MIB:.0f} MiB"
    print(
        f"\nkill -9 at {written_before_crash / MIB:.0f} MiB, resumed from "
        f"{backup.resumed_from / MIB:.0f} MiB, re-copied {recopied / MIB:.0f} MiB "
        f"({100 * recopied / size:.1f} %)"
    )


async def test_temporal_server_restart_mid_backup(
    client: Client, settings: Settings, dev_server: DevServer, make_vm, host_name: str
) -> None:
    import dataclasses

    slow = dataclasses.replace(settings, backup_rate_limit_bps=80e6)
    vm = make_vm(size=512 * MIB, data_bytes=384 * MIB)
    async with running_workers(client, slow, hosts=[host_name], backup=True):
        answer = await starter.create_snapshot(client, request_for(vm.name, host_name, slow))
        await wait_for_progress(client, answer.id, 0.2)
        dev_server.stop()
        await asyncio.sleep(1.0)
        dev_server.start()  # same SQLite file, same port
        record = await asyncio.wait_for(starter.wait_settled(client, answer.id), 180)
    assert_backup_is_the_snapshot(record, vm.reference)
