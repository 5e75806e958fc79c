"""The backup repository's jobs on the workers, on the real Temporal server: schedules for
verify, gc and sync, each run a RepositoryJob workflow; damage raises an alert."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import RepositoryJobResult
from snapferry.activities.settings import Settings
from snapferry.activities.storage.backup_image import backup_image
from snapferry.activities.storage.repository.packs import all_packs
from snapferry.workers.demo_vm import MIB

from ..conftest import snapferry_cli
from .helpers import images_identical
from .test_kvm_incremental import backed_up

pytestmark = [pytest.mark.integration, pytest.mark.backup_store("repository")]


async def scheduled_run(client: Client, schedule_id: str) -> RepositoryJobResult:
    """Trigger a schedule now and wait for the workflow run it started; its result."""
    handle = client.get_schedule_handle(schedule_id)
    await handle.trigger()
    for _ in range(200):
        desc = await handle.describe()
        if desc.info.recent_actions:
            started = desc.info.recent_actions[-1].action
            run = client.get_workflow_handle(started.workflow_id)  # type: ignore[attr-defined]
            result = await asyncio.wait_for(run.result(), 60)
            return RepositoryJobResult.model_validate(result)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{schedule_id} started nothing")


async def test_scheduled_jobs_run_on_the_workers_and_damage_raises_an_alert(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str, tmp_path: Path
) -> None:
    vm = make_vm(size=16 * MIB, data_bytes=8 * MIB)
    record = await backed_up(client, vm.name, host_name, settings)
    assert record.backup is not None

    made = await snapferry_cli("repository", "schedule", "verify", "--every", "daily")
    assert made.returncode == 0, made.stderr
    twice = await snapferry_cli("repository", "schedule", "verify", "--every", "daily")
    assert twice.returncode == 1 and "exists already" in twice.stderr
    second = tmp_path / "zone2"
    sync = await snapferry_cli(
        "repository",
        "schedule",
        "sync",
        "--every",
        "hourly",
        "--to",
        str(second),
        "--rate-limit",
        "50",
    )
    assert sync.returncode == 0, sync.stderr
    bad = await snapferry_cli("repository", "schedule", "sync", "--every", "hourly", "--replace")
    assert bad.returncode == 1 and "--to" in bad.stderr
    listed = json.loads((await snapferry_cli("repository", "schedules", "--json")).stdout)
    by_id = {row["schedule_id"]: row for row in listed}
    assert by_id["repository-verify"]["every_s"] == 86400
    assert by_id["repository-sync"]["job"]["rate_limit_mbps"] == 50

    verified = await scheduled_run(client, "repository-verify")
    assert verified.ok and verified.counters["blobs"] > 0
    synced = await scheduled_run(client, "repository-sync")
    assert synced.counters["backups_copied"] == 1
    # The second store restores on its own.
    copy = second / Path(record.backup.manifest_path).relative_to(settings.repository)
    with backup_image(copy) as raw:
        assert images_identical(vm.reference, raw)

    # A bit flipped on the medium: the verify run fails, naming the backup, with an alert.
    pack = next(all_packs(settings.repository))
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x01
    pack.write_bytes(bytes(data))
    run = await snapferry_cli("repository", "run", "verify")
    assert run.returncode == 1 and "damage" in run.stderr, run.stderr
    alerts = settings.alert_log.read_text()
    assert "REPOSITORY.VERIFY.DAMAGED" in alerts and record.id in alerts

    gc = await snapferry_cli("repository", "run", "gc", "--json")
    assert gc.returncode == 0 and json.loads(gc.stdout)["ok"], gc.stderr
    gone = await snapferry_cli("repository", "unschedule", "verify")
    assert gone.returncode == 0
    again = await snapferry_cli("repository", "unschedule", "verify")
    assert again.returncode == 1 and "no verify schedule" in again.stderr
