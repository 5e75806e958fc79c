"""Record workflow histories for the replay tests: ``python -m tests.replay.record [NAME...]``.

With names, only those recordings are made (``volume``, ``entity``, ``vm``, ``cleanup``), so
that older histories, which stand for workflows recorded by older code, are kept as they are.

Run it only when a workflow change is deliberate (and guarded with ``workflow.patched``);
the committed histories are what running workflows in production look like, and replaying
them against the current code proves the change does not break them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

from temporalio.exceptions import ApplicationError

from snapferry.activities.contracts import VmRef, VmSnapshotRequest, VmSnapshotType, new_snapshot_id
from snapferry.workflows.routing import (
    CONTROL_QUEUE,
    backup_workflow_id,
    snapshot_workflow_id,
    vm_snapshot_workflow_id,
)
from snapferry.workflows.snapshot import VolumeSnapshotWorkflow
from snapferry.workflows.vm_snapshot import VmSnapshotWorkflow
from tests.workflow.conftest import HOST, Mocks, make_request

HISTORIES = Path(__file__).parent / "histories"


async def record(names: set[str]) -> None:
    from tests.workflow import conftest

    env_gen = conftest.env.__wrapped__()  # type: ignore[attr-defined]
    env = await env_gen.__anext__()
    mocks_gen = conftest.mocks.__wrapped__(env)  # type: ignore[attr-defined]
    mocks: Mocks = await mocks_gen.__anext__()

    def transient(_req):  # type: ignore[no-untyped-def]
        raise ApplicationError("store gone", type="SecondaryStoreUnavailable")

    # 1. happy path; 2. a backup that fails for good, then an operator retry.
    volume_cases = (("happy", []), ("failed-then-retried", [transient] * 4))
    for name, outcomes in volume_cases if "volume" in names else ():
        mocks.backup_outcomes = list(outcomes)
        req = make_request()
        handle = await env.client.start_workflow(
            VolumeSnapshotWorkflow.run,
            req,
            id=snapshot_workflow_id(req.snapshot_id),
            task_queue=CONTROL_QUEUE,
        )
        await handle.execute_update(VolumeSnapshotWorkflow.wait_taken)
        if outcomes:
            while not (await handle.query(VolumeSnapshotWorkflow.get_record)).backup_error:
                await env.sleep(60)
            await handle.execute_update(VolumeSnapshotWorkflow.retry_backup)
        await handle.result()
        HISTORIES.mkdir(exist_ok=True)
        (HISTORIES / f"volume-snapshot-{name}.json").write_text(
            (await handle.fetch_history()).to_json()
        )
        child = env.client.get_workflow_handle(backup_workflow_id(req.snapshot_id, 1))
        (HISTORIES / f"backup-snapshot-{name}.json").write_text(
            (await child.fetch_history()).to_json()
        )
        print(f"recorded {name}")
    if "entity" in names:  # a volume snapshot that lives on: reverted, then deleted
        req = make_request()
        handle = await env.client.start_workflow(
            VolumeSnapshotWorkflow.run,
            req,
            id=snapshot_workflow_id(req.snapshot_id),
            task_queue=CONTROL_QUEUE,
        )
        await handle.execute_update(VolumeSnapshotWorkflow.wait_taken)
        while not (await handle.query(VolumeSnapshotWorkflow.get_record)).primary_released:
            await env.sleep(1)
        await handle.execute_update(VolumeSnapshotWorkflow.revert_volume)
        await handle.execute_update(VolumeSnapshotWorkflow.delete_snapshot)
        await handle.result()
        (HISTORIES / "volume-snapshot-entity-reverted-deleted.json").write_text(
            (await handle.fetch_history()).to_json()
        )
        print("recorded entity")
    if "cleanup" in names:  # deletes whose release fails, a take whose discard fails
        await record_failed_cleanups(env, mocks)
    if "vm" in names:  # a VM snapshot: created, reverted, deleted
        vm_req = VmSnapshotRequest(
            snapshot_id=new_snapshot_id(),
            vm=VmRef(name="vm1", host=HOST),
            type=VmSnapshotType.DISK_AND_MEMORY,
        )
        vm_handle = await env.client.start_workflow(
            VmSnapshotWorkflow.run,
            vm_req,
            id=vm_snapshot_workflow_id(vm_req.snapshot_id),
            task_queue=CONTROL_QUEUE,
        )
        await vm_handle.execute_update(VmSnapshotWorkflow.wait_created)
        await vm_handle.execute_update(VmSnapshotWorkflow.revert)
        await vm_handle.execute_update(VmSnapshotWorkflow.delete)
        await vm_handle.result()
        (HISTORIES / "vm-snapshot-reverted-deleted.json").write_text(
            (await vm_handle.fetch_history()).to_json()
        )
        print("recorded vm")
    await mocks_gen.aclose()
    await env_gen.aclose()


async def record_failed_cleanups(env, mocks: Mocks) -> None:  # type: ignore[no-untyped-def]
    """1. a snapshot whose backup failed, deleted while its release fails; 2. a take that
    failed and whose discard failed too. Each is then finished, whatever the code it is
    recorded with made of it (Destroyed, or Error waiting for the delete to be sent again)."""
    from snapferry.activities.contracts import SnapshotState
    from snapferry.activities.names import DISCARD_SNAPSHOT, RELEASE_PRIMARY

    def full(_req):  # type: ignore[no-untyped-def]
        raise ApplicationError("no space", type="SecondaryStoreFull")

    locked = ApplicationError("domain lock held", type="DomainLocked", non_retryable=True)
    mocks.backup_outcomes = [full]
    req = make_request()
    handle = await env.client.start_workflow(
        VolumeSnapshotWorkflow.run, req, id=snapshot_workflow_id(req.snapshot_id),
        task_queue=CONTROL_QUEUE,
    )  # fmt: skip
    await handle.execute_update(VolumeSnapshotWorkflow.wait_taken)
    while not (await handle.query(VolumeSnapshotWorkflow.get_record)).backup_error:
        await env.sleep(1)
    mocks.vm_errors[RELEASE_PRIMARY] = locked
    with contextlib.suppress(Exception):  # a failed delete, to be sent again
        await handle.execute_update(VolumeSnapshotWorkflow.delete_snapshot)
    del mocks.vm_errors[RELEASE_PRIMARY]
    if (await handle.query(VolumeSnapshotWorkflow.get_record)).state == SnapshotState.ERROR:
        await handle.execute_update(VolumeSnapshotWorkflow.delete_snapshot)
    await handle.result()
    (HISTORIES / "volume-snapshot-delete-release-failed.json").write_text(
        (await handle.fetch_history()).to_json()
    )
    mocks.take_error = ApplicationError("disk busy", type="InvalidInput", non_retryable=True)
    mocks.vm_errors[DISCARD_SNAPSHOT] = locked
    req = make_request()
    handle = await env.client.start_workflow(
        VolumeSnapshotWorkflow.run, req, id=snapshot_workflow_id(req.snapshot_id),
        task_queue=CONTROL_QUEUE,
    )  # fmt: skip
    while (await handle.query(VolumeSnapshotWorkflow.get_record)).state != SnapshotState.ERROR:
        await env.sleep(1)
    await env.sleep(60)  # the alert after the discard
    mocks.take_error = None
    del mocks.vm_errors[DISCARD_SNAPSHOT]
    if (await handle.describe()).status.name == "RUNNING":  # type: ignore[union-attr]
        await handle.execute_update(VolumeSnapshotWorkflow.delete_snapshot)
    await handle.result()
    (HISTORIES / "volume-snapshot-take-discard-failed.json").write_text(
        (await handle.fetch_history()).to_json()
    )
    print("recorded cleanup")


if __name__ == "__main__":
    asyncio.run(record(set(sys.argv[1:]) or {"volume", "entity", "vm"}))
    sys.stdout.flush()
    os._exit(0)
