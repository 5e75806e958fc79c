"""A backup that fails for good alerts, keeps the snapshot on primary, and can be retried;
bad input gets a clear error and creates nothing."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import SnapshotState
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers

from ..conftest import snapferry_cli
from .helpers import images_identical, request_for

pytestmark = pytest.mark.integration


class Webhook:
    """An HTTP server the test owns, on 127.0.0.1, recording every JSON POST."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    try:
        yield hook
    finally:
        hook.close()


def chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True)


async def test_unwritable_store_retries_then_alerts_and_retry_completes(
    client: Client, settings: Settings, make_vm, host_name: str, webhook: Webhook
) -> None:
    alerting = dataclasses.replace(settings, alert_webhook=webhook.url)
    vm = make_vm(size=32 * MIB, data_bytes=8 * MIB)
    store_dir = settings.secondary / "snapshots" / vm.name / "vda"
    store_dir.mkdir(parents=True)
    chattr("+i", store_dir)  # immutable: even root cannot create files in it
    try:
        async with running_workers(client, alerting, hosts=[host_name], backup=True):
            answer = await starter.create_snapshot(
                client, request_for(vm.name, host_name, alerting)
            )
            record = answer
            for _ in range(200):
                record = await starter.get_record(client, answer.id)
                if record.backup_error:
                    break
                await _sleep()
            assert record.backup_error, "the backup never failed"
            assert "not writable" in record.backup_error
            assert record.state == SnapshotState.CREATED_ON_PRIMARY

            # The alert reached both sinks, once.
            log_lines = alerting.alert_log.read_text().splitlines()
            failed = [line for line in log_lines if "SNAPSHOT.BACKUP.FAILED" in line]
            assert len(failed) == 1 and answer.id in failed[0]
            hooks = [h for h in webhook.received if h["event"] == "SNAPSHOT.BACKUP.FAILED"]
            assert len(hooks) == 1 and hooks[0]["snapshot_id"] == answer.id
            # The backup was retried: 1 + SNAPFERRY_BACKUP_RETRY=2 attempts.
            history = client.get_workflow_handle(f"backup-{answer.id}-1")
            desc = await history.describe()
            assert desc.status is not None and desc.status.name == "FAILED"

            # Nothing lost: the frozen image on primary is the snapshot, intact.
            assert record.primary is not None
            assert Path(record.primary.image).exists()
            assert images_identical(vm.reference, record.primary.image, fmt_b="qcow2")

            chattr("-i", store_dir)
            proc = await snapferry_cli("backup", "retry", answer.id)
            assert proc.returncode == 0, proc.stderr
            done = await starter.wait_settled(client, answer.id)
    finally:
        chattr("-i", store_dir)
    assert done.state == SnapshotState.BACKED_UP and done.backup is not None
    assert images_identical(vm.reference, done.backup.path)
    assert done.backup_attempts == 2
    assert not list(store_dir.glob("*.partial"))


async def _sleep() -> None:
    import asyncio

    await asyncio.sleep(0.1)


async def test_retry_is_refused_for_a_snapshot_that_did_not_fail(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str
) -> None:
    vm = make_vm(size=16 * MIB, data_bytes=4 * MIB)
    answer = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
    await starter.wait_settled(client, answer.id)
    proc = await snapferry_cli("backup", "retry", answer.id)
    assert proc.returncode != 0
    assert (
        "no snapshot with ID" in proc.stderr or "only a snapshot whose backup failed" in proc.stderr
    )


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


async def test_bad_input_gets_clear_errors_and_creates_nothing(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str
) -> None:
    vm = make_vm(size=16 * MIB, data_bytes=4 * MIB)
    primary_before = files_under(vm.disk.parent)

    unknown_vm = await snapferry_cli(
        "snapshot", "create", "--vm", "no-such-vm", "--disk", "vda", "--host", host_name
    )
    assert unknown_vm.returncode == 1
    assert "VM 'no-such-vm' does not exist" in unknown_vm.stderr

    unknown_disk = await snapferry_cli(
        "snapshot", "create", "--vm", vm.name, "--disk", "vdz", "--host", host_name
    )
    assert unknown_disk.returncode == 1
    assert "has no disk 'vdz'" in unknown_disk.stderr

    for bad in ("../../etc", "a/b", "..", "-rf", ""):
        proc = await snapferry_cli(
            "snapshot", "create", f"--vm={bad}", "--disk", "vda", "--host", host_name
        )
        assert proc.returncode != 0, bad
        assert "invalid input" in proc.stderr and "volume.vm.name" in proc.stderr, proc.stderr
    traversal_disk = await snapferry_cli(
        "snapshot", "create", "--vm", vm.name, "--disk", "../x", "--host", host_name
    )
    assert "invalid input" in traversal_disk.stderr and "volume.disk" in traversal_disk.stderr

    for cmd in (
        ["snapshot", "show", "not-a-uuid"],
        ["backup", "retry", "../../x"],
        ["snapshot", "wait", "123", "--state", "BackedUp"],
    ):
        proc = await snapferry_cli(*cmd)
        assert proc.returncode == 1
        assert "is not a snapshot ID" in proc.stderr, proc.stderr
    missing = await snapferry_cli("snapshot", "show", str(uuid.uuid4()))
    assert missing.returncode == 1 and "no snapshot with ID" in missing.stderr

    # Nothing was created: no overlay on primary, nothing on secondary, and the only
    # workflows are the two takes that failed cleanly (recorded as Error, for the audit).
    assert files_under(vm.disk.parent) == primary_before
    assert files_under(settings.secondary) == []
    rows = await starter.list_snapshots(client)
    assert {r["state"] for r in rows} <= {"Error"}
    assert len(rows) == 2
