"""A non-Python client (the Go ``temporal`` CLI) drives snapferry with nothing but the
exported JSON Schemas and the published names, as CloudStack's Java management server would:
create → answer → BackedUp → delete, and malformed payloads that fail fast with the bad
field named instead of leaving a workflow Running forever."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import jsonschema
import pytest
from temporalio.client import Client

from snapferry.activities.contracts import new_snapshot_id
from snapferry.activities.settings import Settings
from snapferry.workers.demo_vm import MIB

pytestmark = pytest.mark.integration

TEMPORAL = str(Path(sys.executable).parent / "temporal")


async def temporal(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    """The Go CLI, off the event loop (the in-process workers share it)."""
    cmd = [TEMPORAL, *args, "--address", settings.temporal_address, "-o", "json"]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def schemas(tmp_path: Path) -> dict[str, dict]:
    out = tmp_path / "schemas"
    exe = shutil.which("snapferry", path=str(Path(sys.executable).parent)) or "snapferry"
    subprocess.run([exe, "schema", "--out", str(out)], check=True, capture_output=True)
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


async def wait_failed(settings: Settings, workflow_id: str) -> str:
    """The workflow's failure message once it is Failed (never left Running)."""
    for _ in range(100):
        described = await temporal(settings, "workflow", "describe", "-w", workflow_id)
        info = json.loads(described.stdout or "{}").get("workflowExecutionInfo", {})
        status = info.get("status", "")
        if "FAILED" in status:
            result = await temporal(settings, "workflow", "result", "-w", workflow_id)
            return result.stdout + result.stderr
        assert "COMPLETED" not in status and "TERMINATED" not in status, status
        await asyncio.sleep(0.2)
    raise AssertionError(f"{workflow_id} is still {status!r}: a stuck workflow")


VALID_ID = "6f1c2a8e-3b7d-4e59-9a10-2c4d8e6f0b13"  # well-formed, so the other field is the fault

MALFORMED = [
    ("VolumeSnapshot", "{}", "snapshot_id"),
    ("VolumeSnapshot", '"a string"', "SnapshotRequest"),
    ("VolumeSnapshot", "42", "SnapshotRequest"),
    (
        "VolumeSnapshot",
        json.dumps(
            {"snapshot_id": "../../etc/passwd", "volume": {"vm": {"name": "v", "host": "h"}}}
        ),
        "snapshot_id",
    ),
    # Fixed IDs: parametrized IDs must be the same in every collecting process (xdist).
    ("VolumeSnapshot", json.dumps({"snapshot_id": VALID_ID, "volume": None}), "volume"),
    ("VmSnapshot", "{}", "snapshot_id"),
    (
        "VmSnapshot",
        json.dumps({"snapshot_id": VALID_ID, "vm": {"name": "-rf", "host": "h"}}),
        "vm.name",
    ),
]


@pytest.mark.parametrize(("workflow_type", "payload", "field"), MALFORMED)
async def test_a_malformed_start_fails_naming_the_field(
    client: Client, settings: Settings, workers: None, workflow_type: str, payload: str, field: str
) -> None:
    workflow_id = f"foreign-{uuid.uuid4().hex[:8]}"
    started = await temporal(
        settings,
        *("workflow", "start", "--type", workflow_type, "--task-queue", "snapferry"),
        *("--workflow-id", workflow_id, "--input", payload),
    )
    assert started.returncode == 0, started.stderr
    message = await wait_failed(settings, workflow_id)
    assert "InvalidInput" in message and field in message, message


async def test_the_whole_cycle_from_the_go_cli_with_the_published_schemas(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    host_name: str,
    schemas: dict[str, dict],
) -> None:
    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    sid = new_snapshot_id()
    request = {
        "snapshot_id": sid,
        "volume": {"vm": {"name": vm.name, "host": host_name, "hypervisor": "kvm"}, "disk": "vda"},
        "backup": {"retry_attempts": 2, "retry_interval_s": 0.5},
    }
    jsonschema.validate(request, schemas["SnapshotRequest"])  # what a Java caller checks
    workflow_id = f"volume-snapshot-{sid}"
    answered = await temporal(
        settings,
        *("workflow", "execute-update-with-start", "--update-name", "wait_taken"),
        *("--workflow-id", workflow_id, "--type", "VolumeSnapshot"),
        *("--task-queue", "snapferry", "--id-conflict-policy", "UseExisting"),
        *("--input", json.dumps(request)),
    )
    assert answered.returncode == 0, answered.stderr
    answer = json.loads(answered.stdout)
    record = answer.get("updateResult") or answer.get("result") or answer
    if isinstance(record, str):
        record = json.loads(record)
    jsonschema.validate(record, schemas["SnapshotRecord"])
    assert record["state"] == "CreatedOnPrimary" and record["id"] == sid

    for _ in range(300):
        queried = await temporal(
            settings, "workflow", "query", "-w", workflow_id, "--name", "record"
        )
        assert queried.returncode == 0, queried.stderr
        record = json.loads(queried.stdout)["queryResult"][0]
        if record["state"] == "BackedUp" and record["primary_released"]:
            break
        await asyncio.sleep(0.2)
    assert record["state"] == "BackedUp", record
    # (Not schema-validated: the Go CLI re-renders a query's empty lists as null, which the
    # update answer above, validated, does not.)
    assert record["backup"]["checksum"].startswith("sha256-runs:")

    # A malformed update argument is refused with a message, and changes nothing.
    bad = await temporal(
        settings,
        *("workflow", "update", "execute", "-w", workflow_id, "--name", "create_volume"),
        *("--input", '"../escape"'),
    )
    assert bad.returncode != 0 and "not a valid name" in (bad.stdout + bad.stderr)
    wrong_type = await temporal(
        settings,
        *("workflow", "update", "execute", "-w", workflow_id, "--name", "create_volume"),
        *("--input", "42"),
    )
    assert wrong_type.returncode != 0 and "InvalidInput" in (wrong_type.stdout + wrong_type.stderr)

    deleted = await temporal(
        settings, "workflow", "update", "execute", "-w", workflow_id, "--name", "delete_snapshot"
    )
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["result"]["state"] == "Destroyed"
    assert not Path(record["backup"]["path"]).exists()
