"""VolumeSnapshot and BackupSnapshot with mock activities under the real names."""

from __future__ import annotations

import pytest
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from snapferry.activities.contracts import CopyRequest, SnapshotState
from snapferry.activities.names import (
    BACKUP_SNAPSHOT,
    DELETE_BACKUP,
    DISCARD_SNAPSHOT,
    RAISE_ALERT,
    RELEASE_PRIMARY,
    REVERT_VOLUME,
    TAKE_SNAPSHOT,
)
from snapferry.workers import starter
from snapferry.workers.starter import SnapferryClientError
from snapferry.workflows.routing import snapshot_workflow_id
from snapferry.workflows.snapshot import VolumeSnapshotWorkflow

from .conftest import PRIMARY, Mocks, make_request


async def until_settled(env: WorkflowEnvironment, handle):
    """Let (skipped) time pass until the snapshot is settled; return the record."""
    for _ in range(200):
        record = await handle.query(VolumeSnapshotWorkflow.get_record)
        if starter.settled(record):
            return record
        await env.sleep(1)
    raise AssertionError(f"never settled: {record.state}")


async def until_backup_failed(env: WorkflowEnvironment, handle, step_s: float):
    """Let (skipped) time pass until the record shows a failed backup; return the record."""
    for _ in range(100):
        record = await handle.query(VolumeSnapshotWorkflow.get_record)
        if record.backup_error:
            return record
        await env.sleep(step_s)
    raise AssertionError("the backup never failed")


async def start(env: WorkflowEnvironment, req):
    """Start only: each test sends the ``wait_taken`` update itself. The caller's real path,
    update-with-start, has its own test below."""
    handle = await env.client.start_workflow(
        VolumeSnapshotWorkflow.run,
        req,
        id=snapshot_workflow_id(req.snapshot_id),
        task_queue="snapferry",
    )
    return handle


async def test_answer_at_created_on_primary_then_backup_then_release(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    req = make_request()
    handle = await start(env, req)
    answer = await handle.execute_update(VolumeSnapshotWorkflow.wait_taken)
    assert answer.state == SnapshotState.CREATED_ON_PRIMARY
    assert answer.primary == PRIMARY and answer.backup is None
    record = await until_settled(env, handle)
    assert [t.state for t in record.transitions] == [
        SnapshotState.ALLOCATED,
        SnapshotState.CREATING,
        SnapshotState.CREATED_ON_PRIMARY,
        SnapshotState.BACKING_UP,
        SnapshotState.BACKED_UP,
    ]
    assert record.primary_released and record.backup is not None
    assert [n for n, _ in mocks.calls] == [TAKE_SNAPSHOT, BACKUP_SNAPSHOT, RELEASE_PRIMARY]
    assert mocks.named(RELEASE_PRIMARY)[0].source == PRIMARY
    assert mocks.named(RAISE_ALERT) == []

    # The snapshot stays open as an entity until it is deleted.
    reverted = await handle.execute_update(VolumeSnapshotWorkflow.revert_volume)
    assert reverted.reverts == 1
    revert_req = mocks.named(REVERT_VOLUME)[0]
    assert revert_req.primary is None  # released: the revert must come from secondary
    assert revert_req.manifest_path == record.backup.manifest_path
    deleted = await handle.execute_update(VolumeSnapshotWorkflow.delete_snapshot)
    assert deleted.state == SnapshotState.DESTROYED
    assert mocks.named(DELETE_BACKUP)[0].snapshot_id == record.id
    final = await handle.result()
    assert [t.state for t in final.transitions][-2:] == [
        SnapshotState.DESTROYING,
        SnapshotState.DESTROYED,
    ]
    with pytest.raises(Exception):  # noqa: B017 (a closed workflow refuses updates)
        await handle.execute_update(VolumeSnapshotWorkflow.delete_snapshot)


async def test_backup_retries_then_alerts_keeps_primary_and_operator_retry_completes(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    def transient(_req: CopyRequest):
        raise ApplicationError("store gone", type="SecondaryStoreUnavailable")

    # CloudStack defaults: 3 retries 300 s apart (time-skipping makes them instant).
    mocks.backup_outcomes = [transient] * 4
    req = make_request()
    handle = await start(env, req)
    await handle.execute_update(VolumeSnapshotWorkflow.wait_taken)
    record = await until_backup_failed(env, handle, 60)
    assert record.state == SnapshotState.CREATED_ON_PRIMARY
    assert record.backup_error and "SecondaryStoreUnavailable: store gone" in record.backup_error
    assert len(mocks.named(BACKUP_SNAPSHOT)) == 4
    alerts = mocks.named(RAISE_ALERT)
    assert [a.event for a in alerts] == ["SNAPSHOT.BACKUP.FAILED"]
    assert req.snapshot_id in alerts[0].message and "kept on primary" in alerts[0].message
    assert mocks.named(RELEASE_PRIMARY) == []  # nothing deleted

    retried = await handle.execute_update(VolumeSnapshotWorkflow.retry_backup)
    assert retried.state == SnapshotState.CREATED_ON_PRIMARY
    final = await until_settled(env, handle)
    assert final.state == SnapshotState.BACKED_UP and final.backup_attempts == 2
    assert final.backup_error is None and final.primary_released


async def test_permanent_backup_error_is_not_retried(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    def full(_req: CopyRequest):
        raise ApplicationError("no space", type="SecondaryStoreFull")

    mocks.backup_outcomes = [full]
    handle = await start(env, make_request())
    await handle.execute_update(VolumeSnapshotWorkflow.wait_taken)
    record = await until_backup_failed(env, handle, 1)
    assert len(mocks.named(BACKUP_SNAPSHOT)) == 1
    assert "SecondaryStoreFull" in (record.backup_error or "")
    await handle.terminate()


async def test_take_failure_is_error_with_alert_and_the_caller_hears_why(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    mocks.take_error = ApplicationError(
        "VM 'vm1' does not exist", type="VmNotFound", non_retryable=True
    )
    req = make_request()
    handle = await start(env, req)
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update(VolumeSnapshotWorkflow.wait_taken)
    assert "VM 'vm1' does not exist" in str(info.value.cause)
    record = await handle.result()
    assert record.state == SnapshotState.ERROR
    assert len(mocks.named(TAKE_SNAPSHOT)) == 1  # non-retryable: one attempt
    assert [a.event for a in mocks.named(RAISE_ALERT)] == ["SNAPSHOT.TAKE.FAILED"]
    assert mocks.named(BACKUP_SNAPSHOT) == []
    # Whatever the failed attempts left on primary is removed before the alert goes out.
    (discarded,) = mocks.named(DISCARD_SNAPSHOT)
    assert discarded.snapshot_id == req.snapshot_id and discarded.vm == req.volume.vm
    assert [n for n, _ in mocks.calls][-2:] == [DISCARD_SNAPSHOT, RAISE_ALERT]


async def test_retry_of_a_healthy_backup_is_refused(env: WorkflowEnvironment, mocks: Mocks) -> None:
    req = make_request()
    await start(env, req)
    handle = env.client.get_workflow_handle_for(
        VolumeSnapshotWorkflow.run, snapshot_workflow_id(req.snapshot_id)
    )
    await handle.execute_update(VolumeSnapshotWorkflow.wait_taken)
    await until_settled(env, handle)
    with pytest.raises(SnapferryClientError, match="only a snapshot"):
        await starter.retry_backup(env.client, req.snapshot_id)


async def test_delete_while_a_backup_fails_keeps_nothing_and_ends(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    def transient(_req: CopyRequest):
        raise ApplicationError("store gone", type="SecondaryStoreUnavailable")

    mocks.backup_outcomes = [transient] * 4
    handle = await start(env, make_request())
    await handle.execute_update(VolumeSnapshotWorkflow.wait_taken)
    await until_backup_failed(env, handle, 60)
    deleted = await handle.execute_update(VolumeSnapshotWorkflow.delete_snapshot)
    assert deleted.state == SnapshotState.DESTROYED
    assert len(mocks.named(DELETE_BACKUP)) == 1  # clears whatever a failed backup left
    assert len(mocks.named(RELEASE_PRIMARY)) == 1  # the primary snapshot is merged away
    assert (await handle.result()).state == SnapshotState.DESTROYED


async def test_operations_that_make_no_sense_are_refused(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    handle = await start(env, make_request())
    await handle.execute_update(VolumeSnapshotWorkflow.wait_taken)
    await until_settled(env, handle)
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update(VolumeSnapshotWorkflow.cancel_backup)
    assert "no backup is running" in str(info.value.cause)
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update(VolumeSnapshotWorkflow.create_volume, "../evil")
    assert "not a valid name" in str(info.value.cause)
    await handle.execute_update(VolumeSnapshotWorkflow.delete_snapshot)


async def test_update_with_start_answers_at_created_on_primary_and_is_idempotent(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    req = make_request()
    answer = await starter.create_snapshot(env.client, req)
    assert answer.state == SnapshotState.CREATED_ON_PRIMARY
    handle = env.client.get_workflow_handle_for(
        VolumeSnapshotWorkflow.run, snapshot_workflow_id(req.snapshot_id)
    )
    await until_settled(env, handle)
    again = await starter.create_snapshot(env.client, req)  # the same ID: no second take
    assert again.state == SnapshotState.BACKED_UP
    assert len(mocks.named(TAKE_SNAPSHOT)) == 1


async def test_a_delete_gives_the_primary_copy_back_whatever_the_backup_kept(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    """After its backup a snapshot's primary copy may be kept as the next delta's base
    (``backed_up=True``), or its release may have failed; its delete asks for it to go
    (``backed_up=False``) either way, and never to be kept as a base."""
    kept = await start(env, make_request())
    await kept.execute_update(VolumeSnapshotWorkflow.wait_taken)
    await until_settled(env, kept)
    mocks.vm_errors[RELEASE_PRIMARY] = ApplicationError(
        "merge refused", type="InvalidInput", non_retryable=True
    )
    failed = await start(env, make_request())
    await failed.execute_update(VolumeSnapshotWorkflow.wait_taken)
    for _ in range(200):  # backed up; the release after it fails, then the alert
        if any(a.event == "SNAPSHOT.RELEASE.FAILED" for a in mocks.named(RAISE_ALERT)):
            break
        await env.sleep(1)
    record = await failed.query(VolumeSnapshotWorkflow.get_record)
    assert record.state == SnapshotState.BACKED_UP and not record.primary_released
    del mocks.vm_errors[RELEASE_PRIMARY]
    for handle in (kept, failed):
        deleted = await handle.execute_update(VolumeSnapshotWorkflow.delete_snapshot)
        assert deleted.state == SnapshotState.DESTROYED
    by_snapshot: dict[str, list[bool]] = {}
    for req in mocks.named(RELEASE_PRIMARY):
        by_snapshot.setdefault(req.snapshot_id, []).append(req.backed_up)
    assert sorted(by_snapshot.values()) == [[True, False], [True, False]], by_snapshot
