"""Prometheus metrics of a real worker process: the Temporal SDK's and
snapferry's own, with the hypervisor as a label, scraped over HTTP and parsed with the
reference parser (prometheus_client)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client

from snapferry.activities.contracts import SnapshotState
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.stack import free_port, spawn, terminate, wait_for_port

from .helpers import request_for

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        value
        for got, value in samples.get(name, [])
        if all(got.get(k) == v for k, v in labels.items())
    )


async def test_a_worker_exports_sdk_and_snapferry_metrics(
    client: Client, settings: Settings, make_vm, host_name: str, tmp_path: Path
) -> None:
    exe = shutil.which("snapferry", path=str(Path(sys.executable).parent)) or "snapferry"
    port = free_port()
    pid = spawn(
        [exe, "worker", "--host", host_name, "--backup", "--metrics-address", str(port)],
        tmp_path / "worker.log",
    )
    try:
        wait_for_port("127.0.0.1", port)
        vm = make_vm(size=64 * MIB, data_bytes=2 * MIB)
        answer = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
        record = await starter.wait_settled(client, answer.id)
        assert record.state == SnapshotState.BACKED_UP and record.backup is not None
        failed = await asyncio.to_thread(
            subprocess.run,
            [exe, "snapshot", "create", "--vm", "no-such-vm", "--disk", "vda", "--host", host_name],
            capture_output=True,
            text=True,
        )
        assert failed.returncode == 1
        samples: dict = {}
        for _ in range(50):  # the SDK exports on its own cadence
            samples = scrape(port)
            if total(samples, "snapferry_alerts_raised_total") >= 1:
                break
            await asyncio.sleep(0.2)
    finally:
        terminate(pid)

    kvm = {"hypervisor": "kvm"}
    assert total(samples, "snapferry_backups_started_total", **kvm) == 1
    assert total(samples, "snapferry_backups_completed_total", **kvm) == 1
    assert total(samples, "snapferry_backups_failed_total", **kvm) == 0
    assert (
        total(samples, "snapferry_backup_bytes_copied_total", **kvm) == record.backup.bytes_copied
    )
    stored = Path(record.backup.path).stat().st_blocks * 512
    assert record.backup.bytes_stored == stored and 2 * MIB <= stored < 64 * MIB
    assert total(samples, "snapferry_backup_bytes_stored_total", **kvm) == stored
    assert total(samples, "snapferry_alerts_raised_total", event="SNAPSHOT.TAKE.FAILED") == 1
    # Histograms: one answer and one backup observed, in seconds.
    assert total(samples, "snapferry_answer_latency_seconds_count", **kvm) == 1
    assert 0 < total(samples, "snapferry_answer_latency_seconds_sum", **kvm) < 60
    assert total(samples, "snapferry_backup_duration_seconds_count", **kvm) == 1
    # The age gauge behind the "BackingUp for over an hour" alert: nothing runs any more.
    assert [v for _l, v in samples["snapferry_backup_oldest_running_age_seconds"]] == [0.0]
    # And the SDK's own: workers polled, activities ran.
    assert any(name.startswith("temporal_") for name in samples)
    assert total(samples, "temporal_activity_execution_latency_count") >= 2
    assert "temporal_workflow_task_queue_poll_succeed_total" in samples
