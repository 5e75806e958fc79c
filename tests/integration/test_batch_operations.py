"""Batch operations for operators after an outage: ``snapshot list
--stuck`` finds what waits, ``backup retry --all-failed [--vm]`` retries it all at a bounded
rate, and says what it did."""

from __future__ import annotations

import json
import time

from temporalio.client import Client

from snapferry.activities.contracts import SnapshotState
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers

from ..conftest import snapferry_cli
from .helpers import request_for
from .test_failures import chattr


async def test_after_a_store_outage_one_command_retries_every_failed_backup(
    client: Client, settings: Settings, make_vm, host_name: str
) -> None:
    vms = [make_vm(size=8 * MIB, data_bytes=MIB, seed=i) for i in range(2)]
    dirs = []
    for vm in vms:
        d = settings.secondary / "snapshots" / vm.name / "vda"
        d.mkdir(parents=True)
        chattr("+i", d)  # the outage: nothing can be written for these volumes
        dirs.append(d)
    try:
        async with running_workers(client, settings, hosts=[host_name], backup=True):
            ids = {vm.name: [] for vm in vms}
            for vm in vms:
                for _ in range(2):
                    answer = await starter.create_snapshot(
                        client, request_for(vm.name, host_name, settings)
                    )
                    ids[vm.name].append(answer.id)
            every = [i for group in ids.values() for i in group]
            for sid in every:
                await starter.wait_settled(client, sid)
            for sid in every:
                assert (await starter.get_record(client, sid)).backup_error

            stuck = await snapferry_cli("snapshot", "list", "--stuck", "0s", "--json")
            assert stuck.returncode == 0, stuck.stderr
            rows = json.loads(stuck.stdout)
            assert {r["id"] for r in rows} >= set(every)
            assert all(r["state"] == "CreatedOnPrimary" and r["backup_error"] for r in rows)
            none = await snapferry_cli("snapshot", "list", "--stuck", "1h", "--json")
            assert json.loads(none.stdout) == []
            bad = await snapferry_cli("snapshot", "list", "--stuck", "soon")
            assert bad.returncode == 2 and "not a duration" in bad.stderr

            for d in dirs:
                chattr("-i", d)  # the store is back
            first, second = vms[0].name, vms[1].name
            started = time.monotonic()
            one_vm = await snapferry_cli(
                "backup", "retry", "--all-failed", "--vm", first, "--rate", "4"
            )
            assert one_vm.returncode == 0, one_vm.stderr
            assert "2 backup(s) restarted, 0 refused" in one_vm.stdout
            assert all(sid in one_vm.stdout for sid in ids[first])
            assert not any(sid in one_vm.stdout for sid in ids[second])
            assert time.monotonic() - started >= 0.5  # two retries at 4/s
            for sid in ids[first]:
                record = await starter.wait_settled(client, sid)
                assert record.state == SnapshotState.BACKED_UP
            assert (await starter.get_record(client, ids[second][0])).backup_error

            rest = await snapferry_cli("backup", "retry", "--all-failed")
            assert rest.returncode == 0 and "2 backup(s) restarted" in rest.stdout
            for sid in ids[second]:
                record = await starter.wait_settled(client, sid)
                assert record.state == SnapshotState.BACKED_UP

            nothing = await snapferry_cli("backup", "retry", "--all-failed")
            assert "0 backup(s) restarted, 0 refused" in nothing.stdout
            usage = await snapferry_cli("backup", "retry", every[0], "--all-failed")
            assert usage.returncode == 1 and "either a snapshot ID or --all-failed" in usage.stderr
    finally:
        for d in dirs:
            chattr("-i", d)
