"""A delete whose release fails, and a failed take whose discard fails, leave the snapshot
in Error with ``delete_error``: its workflow stays open and keeps owning what may be left
on primary, and a delete sent again finishes the job (mock activities, real names)."""

from __future__ import annotations

import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from snapferry.activities.contracts import CopyRequest, SnapshotState
from snapferry.activities.names import (
    DELETE_BACKUP,
    DISCARD_SNAPSHOT,
    RAISE_ALERT,
    RELEASE_PRIMARY,
    TAKE_SNAPSHOT,
)
from snapferry.workers import starter
from snapferry.workers.starter import SnapferryClientError
from snapferry.workflows.routing import snapshot_workflow_id
from snapferry.workflows.snapshot import DELETE_UPDATE, VolumeSnapshotWorkflow

from .conftest import Mocks, make_request
from .test_snapshot_workflow import until_backup_failed, until_settled

LOCKED = ApplicationError(
    "VM 'vm1': domain lock held by another operation for 60 s", type="DomainLocked"
)


async def test_a_delete_whose_release_fails_is_error_and_sent_again(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    """A pending snapshot (its backup failed) is deleted while the VM's domain lock stays
    taken for longer than the release's retries: the delete fails, resendably."""

    def store_down(_req: CopyRequest):
        raise ApplicationError("store gone", type="SecondaryStoreFull")

    mocks.backup_outcomes = [store_down]
    req = make_request()
    await starter.create_snapshot(env.client, req)
    handle = env.client.get_workflow_handle_for(
        VolumeSnapshotWorkflow.run, snapshot_workflow_id(req.snapshot_id)
    )
    await until_backup_failed(env, handle, 1)

    mocks.vm_errors[RELEASE_PRIMARY] = LOCKED
    with pytest.raises(SnapferryClientError, match="delete failed.*send the delete again"):
        await starter.snapshot_operation(env.client, req.snapshot_id, DELETE_UPDATE)
    releases = mocks.named(RELEASE_PRIMARY)
    assert len(releases) == 5 and not any(r.backed_up for r in releases)  # HOST_RETRY
    record = await starter.get_record(env.client, req.snapshot_id)
    assert record.state == SnapshotState.ERROR and not record.primary_released
    assert record.delete_error is not None
    assert "primary copy could not be merged away" in record.delete_error
    assert "domain lock held" in record.delete_error
    events = [a.event for a in mocks.named(RAISE_ALERT)]
    assert "SNAPSHOT.DELETE.FAILED" in events and "SNAPSHOT.RELEASE.FAILED" not in events
    failed = next(a for a in mocks.named(RAISE_ALERT) if a.event == "SNAPSHOT.DELETE.FAILED")
    assert "send the delete again" in failed.message and "backed up" not in failed.message
    description = await handle.describe()
    assert description.status == WorkflowExecutionStatus.RUNNING  # it still owns the layer

    del mocks.vm_errors[RELEASE_PRIMARY]  # the lock is free again
    done = await starter.snapshot_operation(env.client, req.snapshot_id, DELETE_UPDATE)
    assert done.state == SnapshotState.DESTROYED and done.primary_released
    assert len(mocks.named(RELEASE_PRIMARY)) == 6
    assert mocks.named(RELEASE_PRIMARY)[-1].backed_up is False
    assert len(mocks.named(DELETE_BACKUP)) == 2  # the store's part is sent again too
    assert (await handle.result()).state == SnapshotState.DESTROYED


async def test_a_delete_whose_release_of_a_kept_base_fails_is_error_too(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    """A backed-up snapshot whose layer is kept as the next delta's base: its delete must
    release that layer, and fails (resendably) when it cannot."""
    req = make_request()
    await starter.create_snapshot(env.client, req)
    handle = env.client.get_workflow_handle_for(
        VolumeSnapshotWorkflow.run, snapshot_workflow_id(req.snapshot_id)
    )
    assert (await until_settled(env, handle)).state == SnapshotState.BACKED_UP
    mocks.vm_errors[RELEASE_PRIMARY] = LOCKED
    with pytest.raises(SnapferryClientError, match="primary copy could not be merged away"):
        await starter.snapshot_operation(env.client, req.snapshot_id, DELETE_UPDATE)
    assert (await starter.get_record(env.client, req.snapshot_id)).state == SnapshotState.ERROR
    del mocks.vm_errors[RELEASE_PRIMARY]
    done = await starter.snapshot_operation(env.client, req.snapshot_id, DELETE_UPDATE)
    assert done.state == SnapshotState.DESTROYED
    assert mocks.named(RELEASE_PRIMARY)[-1].backed_up is False


async def test_a_failed_take_whose_discard_fails_can_be_deleted_and_the_delete_discards(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    mocks.take_error = ApplicationError("qemu: disk busy", type="InvalidInput", non_retryable=True)
    mocks.vm_errors[DISCARD_SNAPSHOT] = LOCKED
    req = make_request()
    with pytest.raises(SnapferryClientError, match="disk busy"):
        await starter.create_snapshot(env.client, req)
    handle = env.client.get_workflow_handle_for(
        VolumeSnapshotWorkflow.run, snapshot_workflow_id(req.snapshot_id)
    )
    for _ in range(100):  # the discard's retries, then the alert (skipped time)
        if mocks.named(RAISE_ALERT):
            break
        await env.sleep(10)
    record = await starter.get_record(env.client, req.snapshot_id)
    assert record.state == SnapshotState.ERROR and record.primary is None
    assert record.delete_error is not None and "domain lock held" in record.delete_error
    (alert,) = mocks.named(RAISE_ALERT)
    assert alert.event == "SNAPSHOT.TAKE.FAILED" and "delete the snapshot" in alert.message
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    assert len(mocks.named(TAKE_SNAPSHOT)) == 1

    # Still locked: the delete fails and says why, and can be sent again.
    with pytest.raises(SnapferryClientError, match="could not be removed.*domain lock held"):
        await starter.snapshot_operation(env.client, req.snapshot_id, DELETE_UPDATE)
    del mocks.vm_errors[DISCARD_SNAPSHOT]
    done = await starter.snapshot_operation(env.client, req.snapshot_id, DELETE_UPDATE)
    assert done.state == SnapshotState.DESTROYED
    discards = mocks.named(DISCARD_SNAPSHOT)
    assert len(discards) == 11 and discards[-1].snapshot_id == req.snapshot_id
    assert mocks.named(DELETE_BACKUP) == [] and mocks.named(RELEASE_PRIMARY) == []
    assert (await handle.result()).state == SnapshotState.DESTROYED


async def test_a_failed_take_whose_discard_worked_ends_as_before(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    mocks.take_error = ApplicationError("qemu: disk busy", type="InvalidInput", non_retryable=True)
    req = make_request()
    with pytest.raises(SnapferryClientError, match="disk busy"):
        await starter.create_snapshot(env.client, req)
    handle = env.client.get_workflow_handle_for(
        VolumeSnapshotWorkflow.run, snapshot_workflow_id(req.snapshot_id)
    )
    record = await handle.result()
    assert record.state == SnapshotState.ERROR and record.delete_error is None
    with pytest.raises(SnapferryClientError, match="Error; its workflow is closed"):
        await starter.snapshot_operation(env.client, req.snapshot_id, DELETE_UPDATE)
