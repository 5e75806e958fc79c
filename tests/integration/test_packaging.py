"""The install is clean: the wheel holds one package root, ``snapferry``,
and installs into a fresh venv beside an unrelated package named ``workers``; there the CLI
answers and a workflow runs end to end on the time-skipping server."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration

WORKFLOW_RUN = textwrap.dedent(
    """
    import asyncio, os, sys, uuid
    import workers  # the unrelated package of that name: it must still be the one found
    assert workers.UNRELATED is True
    from temporalio import activity
    from temporalio.testing import WorkflowEnvironment
    from temporalio.worker import Worker
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
    from snapferry.activities.contracts import (
        BackupResult, CopyRequest, PrimarySnapshot, ReleaseRequest, SnapshotRequest,
        SnapshotState, TakeRequest, VmRef, VolumeRef, new_snapshot_id)
    from snapferry.activities.names import BACKUP_SNAPSHOT, RELEASE_PRIMARY, TAKE_SNAPSHOT
    from snapferry.workers import starter
    from snapferry.workers.converter import DATA_CONVERTER
    from snapferry.workflows.routing import (
        BACKUP_QUEUE, CONTROL_QUEUE, SEARCH_ATTRIBUTES, host_queue)
    from snapferry.workflows.snapshot import BackupSnapshotWorkflow, VolumeSnapshotWorkflow

    @activity.defn(name=TAKE_SNAPSHOT)
    async def take(req: TakeRequest) -> PrimarySnapshot:
        return PrimarySnapshot(image="/p/d.qcow2", image_format="qcow2",
                               overlay="/p/d.qcow2.o", virtual_size=1 << 20,
                               vm_was_running=True)

    @activity.defn(name=BACKUP_SNAPSHOT)
    async def backup(req: CopyRequest) -> BackupResult:
        return BackupResult(path="/s/x.raw", manifest_path="/s/x.json",
                            checksum="sha256-chain:8388608:" + "ab" * 32,
                            virtual_size=1 << 20, bytes_copied=1 << 20, resumed_from=0,
                            attempts=1)

    @activity.defn(name=RELEASE_PRIMARY)
    async def release(req: ReleaseRequest) -> None:
        return None

    async def main() -> None:
        env = await WorkflowEnvironment.start_time_skipping(
            data_converter=DATA_CONVERTER, test_server_existing_path=sys.argv[1])
        await env.client.operator_service.add_search_attributes(AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={k.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
                               for k in SEARCH_ATTRIBUTES}))
        wfs = [VolumeSnapshotWorkflow, BackupSnapshotWorkflow]
        async with Worker(env.client, task_queue=CONTROL_QUEUE, workflows=wfs), \\
                Worker(env.client, task_queue=BACKUP_QUEUE, workflows=wfs,
                       activities=[backup]), \\
                Worker(env.client, task_queue=host_queue("h1"), activities=[take, release]):
            req = SnapshotRequest(snapshot_id=new_snapshot_id(),
                                  volume=VolumeRef(vm=VmRef(name="vm1", host="h1"), disk="vda"))
            handle = await env.client.start_workflow(
                VolumeSnapshotWorkflow.run, req, id=f"volume-snapshot-{req.snapshot_id}",
                task_queue=CONTROL_QUEUE)
            answer = await handle.execute_update("wait_taken", result_type=None)
            for _ in range(100):
                record = await handle.query("record")
                if record["state"] == "BackedUp" and record["primary_released"]:
                    break
                await env.sleep(1)
            assert record["state"] == "BackedUp", record
            print("workflow ok:", answer["state"], "->", record["state"])
        await env.shutdown()

    asyncio.run(main())
    # Leave before the Temporal client can abort the interpreter at finalisation
    # (temporalio/sdk-python#300: "PyGILState_Release ... finalizing", SIGABRT), as
    # tests/conftest.py does for pytest itself; a failure above still raises first.
    sys.stdout.flush()
    os._exit(0)
    """
)


def test_the_wheel_installs_one_package_root_beside_a_package_named_workers(
    tmp_path: Path,
) -> None:
    # Built from a copy of the source files (git's, plus new ones it does not ignore):
    # setuptools leaves build/ and *.egg-info where it builds, and the source tree must
    # stay as the test found it.
    source = tmp_path / "source"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        src, dst = ROOT / name, source / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, dst)
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = dist.glob("snapferry-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {
        "snapferry",
        wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info",
    }

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    fresh_site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # The dependencies (temporalio, pydantic, ...) from the project's venv, without its
    # editable snapferry: a path entry, whose own .pth files are not processed.
    (fresh_site / "project-deps.pth").write_text(site.getsitepackages()[0] + "\n")
    (fresh_site / "workers").mkdir()
    (fresh_site / "workers" / "__init__.py").write_text("UNRELATED = True\n")
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr

    elsewhere = tmp_path / "elsewhere"  # not the source tree: nothing of it on sys.path
    elsewhere.mkdir()
    helped = subprocess.run(
        [str(venv / "bin" / "snapferry"), "--help"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
    )
    assert helped.returncode == 0 and "usage: snapferry" in helped.stdout, helped.stderr
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import snapferry.workers.cli as c, workers; print(c.__file__); print(workers.__file__)"],
        capture_output=True, text=True, cwd=elsewhere,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    cli_file, workers_file = where.stdout.split()
    assert cli_file.startswith(str(fresh_site)) and workers_file.startswith(str(fresh_site))
    ran = subprocess.run(
        [str(venv / "bin" / "python"), "-c", WORKFLOW_RUN, str(BIN / "temporal-test-server")],
        capture_output=True, text=True, cwd=elsewhere, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "workflow ok: CreatedOnPrimary -> BackedUp" in ran.stdout
