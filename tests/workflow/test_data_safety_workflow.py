"""Data safety on the workflows (mock activities under the real names): a
failed delete can be sent again, an undeliverable alert never fails a snapshot, a moved VM's
operations follow it, and no caller can inject a record."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import WorkflowFailureError, WorkflowUpdateStage
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from snapferry.activities.contracts import (
    SnapshotRecord,
    SnapshotState,
    VmRef,
    VmSnapshotRequest,
    VmSnapshotType,
    new_snapshot_id,
)
from snapferry.activities.names import (
    DELETE_BACKUP,
    RAISE_ALERT,
    RELEASE_PRIMARY,
    REVERT_VOLUME,
    TAKE_SNAPSHOT,
    TAKE_VM_SNAPSHOT,
)
from snapferry.workers import starter
from snapferry.workers.starter import SnapferryClientError
from snapferry.workflows.routing import host_queue, snapshot_workflow_id, vm_snapshot_workflow_id
from snapferry.workflows.snapshot import (
    DELETE_UPDATE,
    MOVE_HOST_UPDATE,
    REVERT_UPDATE,
    VolumeSnapshotWorkflow,
)
from snapferry.workflows.vm_snapshot import VmSnapshotWorkflow

from .conftest import HOST, PRIMARY, Mocks, make_request
from .test_snapshot_workflow import until_settled

STORE_DOWN = ApplicationError(
    "secondary store not writable at /secondary: NFS server not responding",
    type="SecondaryStoreUnavailable",
)


async def test_a_failed_delete_leaves_error_with_the_reason_and_can_be_sent_again(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    req = make_request()
    await starter.create_snapshot(env.client, req)
    handle = env.client.get_workflow_handle(snapshot_workflow_id(req.snapshot_id))
    assert (await until_settled(env, handle)).state == SnapshotState.BACKED_UP

    mocks.vm_errors[DELETE_BACKUP] = STORE_DOWN  # an NFS outage longer than the retries
    with pytest.raises(SnapferryClientError, match="delete failed.*send the delete again"):
        await starter.snapshot_operation(env.client, req.snapshot_id, DELETE_UPDATE)
    record = await starter.get_record(env.client, req.snapshot_id)
    assert record.state == SnapshotState.ERROR
    assert "NFS server not responding" in (record.delete_error or "")
    assert any(a.event == "SNAPSHOT.DELETE.FAILED" for a in mocks.named(RAISE_ALERT))
    # Nothing but the delete is allowed on a half-deleted snapshot.
    with pytest.raises(SnapferryClientError, match="cannot revert"):
        await starter.snapshot_operation(env.client, req.snapshot_id, REVERT_UPDATE)
    assert not mocks.named(REVERT_VOLUME)

    del mocks.vm_errors[DELETE_BACKUP]  # the store is back
    done = await starter.snapshot_operation(env.client, req.snapshot_id, DELETE_UPDATE)
    assert done.state == SnapshotState.DESTROYED
    assert len(mocks.named(DELETE_BACKUP)) >= 2


async def test_an_undeliverable_alert_never_fails_the_snapshot(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    """The release fails for good, and so does the alert about it (a webhook down for
    longer than its retries): the snapshot stays BackedUp and its workflow keeps running."""
    mocks.vm_errors[RELEASE_PRIMARY] = ApplicationError(
        "VM 'vm1' disk 'vda': pivot failed", type="InvalidInput", non_retryable=True
    )
    mocks.vm_errors[RAISE_ALERT] = ApplicationError("webhook: connection refused")
    req = make_request()
    await starter.create_snapshot(env.client, req)
    handle = env.client.get_workflow_handle(snapshot_workflow_id(req.snapshot_id))
    for _ in range(60):  # let the alert's retries run out (skipped time)
        if len(mocks.named(RAISE_ALERT)) >= 10:
            break
        await env.sleep(60)
    assert len(mocks.named(RAISE_ALERT)) >= 10  # ALERT_RETRY's attempts, all failed
    record = await handle.query(VolumeSnapshotWorkflow.get_record)
    assert record.state == SnapshotState.BACKED_UP and not record.primary_released
    description = await handle.describe()
    assert description.status is not None and description.status.name == "RUNNING"
    # And it still serves operations: the delete works once the release does.
    del mocks.vm_errors[RELEASE_PRIMARY]
    done = await starter.snapshot_operation(env.client, req.snapshot_id, DELETE_UPDATE)
    assert done.state == SnapshotState.DESTROYED


async def test_a_caller_cannot_inject_a_carried_record(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    """``carried`` would skip the take and name any file as the primary image."""
    req = make_request()
    forged = SnapshotRecord(
        id=req.snapshot_id,
        state=SnapshotState.BACKED_UP,
        vm="vm1",
        disk="vda",
        host=HOST,
        hypervisor=req.volume.vm.hypervisor,
        primary=PRIMARY.model_copy(update={"image": "/var/lib/other-tenant/disk.qcow2"}),
    )
    handle = await env.client.start_workflow(
        VolumeSnapshotWorkflow.run,
        req.model_copy(update={"carried": forged}),
        id=snapshot_workflow_id(req.snapshot_id),
        task_queue="snapferry",
    )
    with pytest.raises(WorkflowFailureError) as err:
        await handle.result()
    assert "carried" in str(err.value.cause) and "InvalidInput" in repr(err.value.cause)
    assert not mocks.named(TAKE_SNAPSHOT) and not mocks.named(REVERT_VOLUME)

    vm_req = VmSnapshotRequest(
        snapshot_id=new_snapshot_id(), vm=VmRef(name="vm1", host=HOST), type=VmSnapshotType.DISK
    )
    first = await starter.create_vm_snapshot(env.client, vm_req)
    vm_handle = await env.client.start_workflow(
        VmSnapshotWorkflow.run,
        vm_req.model_copy(update={"snapshot_id": new_snapshot_id(), "carried": first}),
        id=vm_snapshot_workflow_id(new_snapshot_id()),
        task_queue="snapferry",
    )
    with pytest.raises(WorkflowFailureError) as vm_err:
        await vm_handle.result()
    assert "carried" in str(vm_err.value.cause) and "InvalidInput" in repr(vm_err.value.cause)
    assert len(mocks.named(TAKE_VM_SNAPSHOT)) == 1


async def test_after_a_migration_host_operations_go_to_the_new_host(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    req = make_request()
    await starter.create_snapshot(env.client, req)
    handle = env.client.get_workflow_handle(snapshot_workflow_id(req.snapshot_id))
    await until_settled(env, handle)
    with pytest.raises(SnapferryClientError, match="cannot move it to host"):
        await starter.snapshot_operation(env.client, req.snapshot_id, MOVE_HOST_UPDATE, "../x")
    moved = await starter.snapshot_operation(env.client, req.snapshot_id, MOVE_HOST_UPDATE, "hv2")
    assert moved.host == "hv2"
    # No worker serves hv2 in this test: the revert must be queued there, not run on hv1.
    await handle.start_update(REVERT_UPDATE, wait_for_stage=WorkflowUpdateStage.ACCEPTED)
    for _ in range(30):
        history = await handle.fetch_history()
        scheduled = [
            e.activity_task_scheduled_event_attributes
            for e in history.events
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
        if scheduled[-1].activity_type.name == REVERT_VOLUME:
            break
        await asyncio.sleep(0.1)
    assert scheduled[-1].activity_type.name == REVERT_VOLUME
    assert scheduled[-1].task_queue.name == host_queue("hv2")
    assert not mocks.named(REVERT_VOLUME)  # hv1's worker never got it
