"""The embedded stack and the CLI end to end, as an operator uses them (``make run``'s path):
``up`` starts a dev server and a background worker, the snapshot commands work with
``--json``, the Web UI answers, and ``up``/``down`` are idempotent."""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import pytest

from snapferry.workers.demo_vm import MIB
from snapferry.workers.stack import free_port

from ..conftest import snapferry_cli
from .helpers import images_identical

pytestmark = pytest.mark.integration


@pytest.fixture
def stack_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "SNAPFERRY_HOME": str(tmp_path / "home"),
        "SNAPFERRY_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "SNAPFERRY_UI_PORT": str(free_port()),
        "SNAPFERRY_SECONDARY": "",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


async def test_up_snapshot_commands_and_down(stack_env: dict[str, str], make_vm) -> None:
    host = f"h{uuid.uuid4().hex[:6]}"
    try:
        first = await snapferry_cli("up", "--host", host)
        assert first.returncode == 0, first.stderr
        again = await snapferry_cli("up", "--host", host)
        assert again.returncode == 0
        assert again.stdout == first.stdout  # idempotent: the same PIDs, nothing new started

        ui = urllib.request.urlopen(
            f"http://127.0.0.1:{stack_env['SNAPFERRY_UI_PORT']}/", timeout=10
        )
        assert ui.status == 200

        vm = make_vm(size=64 * MIB, data_bytes=32 * MIB)
        created = await snapferry_cli(
            "snapshot", "create", "--vm", vm.name, "--disk", "vda", "--host", host, "--json"
        )
        assert created.returncode == 0, created.stderr
        record = json.loads(created.stdout)
        assert record["state"] == "CreatedOnPrimary"
        assert {"id", "state", "vm", "disk", "primary", "backup"} <= record.keys()
        assert record["primary"]["image"] == str(vm.disk)

        watched = await snapferry_cli("snapshot", "watch", record["id"])
        assert watched.returncode == 0, watched.stderr
        assert "100.0%" in watched.stdout and "BackedUp" in watched.stdout

        waited = await snapferry_cli(
            "snapshot", "wait", record["id"], "--state", "BackedUp", "--json"
        )
        done = json.loads(waited.stdout)
        assert done["backup"]["checksum"].startswith("sha256-runs:")
        backup_path = Path(done["backup"]["path"])
        assert backup_path.is_relative_to(Path(stack_env["SNAPFERRY_HOME"]) / "secondary")
        assert images_identical(vm.reference, backup_path)

        listed = json.loads(
            (await snapferry_cli("snapshot", "list", "--vm", vm.name, "--json")).stdout
        )
        assert [(r["id"], r["state"], r["disk"]) for r in listed] == [
            (record["id"], "BackedUp", "vda")
        ]
        exported = Path(stack_env["SNAPFERRY_HOME"]) / "histories"
        replayed = await snapferry_cli("replay", "--export", str(exported))
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert "0 failed" in replayed.stdout and "replayed 0 " not in replayed.stdout
        assert (exported / f"backup-{record['id']}-1.json").exists()
        shown = await snapferry_cli("snapshot", "show", record["id"])
        assert f"snapshot {record['id']}  BackedUp" in shown.stdout
    finally:
        down = await snapferry_cli("down")
    assert down.returncode == 0 and "worker" in down.stdout and "temporal" in down.stdout
    assert "nothing was running" in (await snapferry_cli("down")).stdout
    unreachable = await snapferry_cli("snapshot", "list")
    assert unreachable.returncode == 1 and "snapferry: error:" in unreachable.stderr


async def test_schema_command_writes_json_schemas(tmp_path: Path) -> None:
    proc = await snapferry_cli("schema", "--out", str(tmp_path))
    assert proc.returncode == 0
    schema = json.loads((tmp_path / "SnapshotRecord.json").read_text())
    assert "BackedUp" in json.dumps(schema)
