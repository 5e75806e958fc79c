"""Scale-out on one machine: two "hypervisor host" workers on their own task queues and a
backup pool of two workers, each a separate process, as on a cluster. Each VM's take runs on
its own host's worker, and backups spread across the pool."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import SnapshotState
from snapferry.activities.names import BACKUP_SNAPSHOT, TAKE_SNAPSHOT
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.stack import spawn, terminate

from .helpers import request_for

pytestmark = pytest.mark.integration


def worker(log: Path, *args: str, rate_mbps: int | None = None) -> int:
    env = dict(os.environ)
    if rate_mbps:
        env["SNAPFERRY_BACKUP_RATE_LIMIT_MBPS"] = str(rate_mbps)
    return spawn([sys.executable, "-m", "snapferry.workers.cli", "worker", *args], log, env=env)


async def started_by(client: Client, workflow_id: str, activity: str) -> set[str]:
    """The identities (``pid@host``) of the workers that ran ``activity`` in a history."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    scheduled = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    }
    return {
        e.activity_task_started_event_attributes.identity
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
        and scheduled[e.activity_task_started_event_attributes.scheduled_event_id] == activity
    }


async def test_takes_follow_their_host_and_backups_spread_over_the_pool(
    client: Client, settings: Settings, make_vm, tmp_path: Path
) -> None:
    vms = {
        "hostA": make_vm(size=64 * MIB, data_bytes=48 * MIB, seed=1),
        "hostB": make_vm(size=64 * MIB, data_bytes=48 * MIB, seed=2),
    }
    pids = {
        "hostA": worker(tmp_path / "hostA.log", "--host", "hostA"),
        "hostB": worker(tmp_path / "hostB.log", "--host", "hostB"),
        "pool1": worker(tmp_path / "pool1.log", "--backup", "--concurrency", "1", rate_mbps=24),
        "pool2": worker(tmp_path / "pool2.log", "--backup", "--concurrency", "1", rate_mbps=24),
    }
    try:
        answers = []
        for _round in range(2):
            for host, vm in vms.items():
                req = request_for(vm.name, host, settings)
                answers.append(
                    (host, await asyncio.wait_for(starter.create_snapshot(client, req), 60))
                )
        records = [await starter.wait_settled(client, a.id, timeout=180) for _, a in answers]
    finally:
        for pid in pids.values():
            terminate(pid)
    assert all(r.state == SnapshotState.BACKED_UP for r in records)
    by_pid = {str(pid): name for name, pid in pids.items()}

    def names(identities: set[str]) -> set[str]:
        return {by_pid.get(i.split("@")[0], i) for i in identities}

    backup_workers: set[str] = set()
    for (host, answer), record in zip(answers, records, strict=True):
        took = names(await started_by(client, f"volume-snapshot-{answer.id}", TAKE_SNAPSHOT))
        assert took == {host}, f"{answer.id} of a VM on {host} was taken by {took}"
        assert record.backup_workflow_id
        backup_workers |= names(
            await started_by(client, record.backup_workflow_id, BACKUP_SNAPSHOT)
        )
    assert backup_workers == {"pool1", "pool2"}, backup_workers  # both pool members worked
    print(f"\ntakes on their own hosts; backups ran on {sorted(backup_workers)}")
