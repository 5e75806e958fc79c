"""VmSnapshot with mock activities under the real names: states, answers, refusals."""

from __future__ import annotations

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from snapferry.activities.contracts import (
    VmRef,
    VmSnapshotRecord,
    VmSnapshotRequest,
    VmSnapshotState,
    VmSnapshotType,
    new_snapshot_id,
)
from snapferry.activities.names import (
    DELETE_VM_SNAPSHOT,
    DISCARD_SNAPSHOT,
    RAISE_ALERT,
    REVERT_VM_SNAPSHOT,
    TAKE_VM_SNAPSHOT,
)
from snapferry.workers import starter
from snapferry.workers.starter import SnapferryClientError
from snapferry.workflows.routing import SNAPSHOT_STATE, vm_snapshot_workflow_id
from snapferry.workflows.vm_snapshot import (
    DELETE_VM_SNAPSHOT_UPDATE,
    REVERT_VM_SNAPSHOT_UPDATE,
)

from .conftest import HOST, Mocks


def vm_request(kind: VmSnapshotType = VmSnapshotType.DISK) -> VmSnapshotRequest:
    return VmSnapshotRequest(
        snapshot_id=new_snapshot_id(), vm=VmRef(name="vm1", host=HOST), type=kind, name="nightly"
    )


async def operate(env: WorkflowEnvironment, sid: str, update: str) -> VmSnapshotRecord:
    result: VmSnapshotRecord = await starter.snapshot_operation(
        env.client, sid, update, kind=starter.VM, result_type=VmSnapshotRecord
    )
    return result


async def test_create_revert_delete_walk_the_vmsnapshot_states(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    req = vm_request(VmSnapshotType.DISK_AND_MEMORY)
    answer = await starter.create_vm_snapshot(env.client, req)
    assert answer.state == VmSnapshotState.READY and answer.name == "nightly"
    assert answer.taken is not None and answer.taken.overlays
    assert [t.state for t in answer.transitions] == ["Allocated", "Creating", "Ready"]
    taken_op = mocks.named(TAKE_VM_SNAPSHOT)[0]
    assert taken_op.type == VmSnapshotType.DISK_AND_MEMORY and taken_op.taken is None
    handle = env.client.get_workflow_handle(
        vm_snapshot_workflow_id(req.snapshot_id), result_type=VmSnapshotRecord
    )
    desc = await handle.describe()
    assert desc.typed_search_attributes.get(SNAPSHOT_STATE) == "Ready"

    # Idempotent create: the same ID answers with the same snapshot, no second take.
    again = await starter.create_vm_snapshot(env.client, req)
    assert again.id == answer.id and len(mocks.named(TAKE_VM_SNAPSHOT)) == 1

    reverted = await operate(env, req.snapshot_id, REVERT_VM_SNAPSHOT_UPDATE)
    assert reverted.reverts == 1 and reverted.state == VmSnapshotState.READY
    assert mocks.named(REVERT_VM_SNAPSHOT)[0].taken == answer.taken  # reverts what was taken

    removed = await operate(env, req.snapshot_id, DELETE_VM_SNAPSHOT_UPDATE)
    assert removed.state == VmSnapshotState.REMOVED
    assert [t.state for t in removed.transitions][-4:] == [
        "Reverting",
        "Ready",
        "Expunging",
        "Removed",
    ]
    assert (await handle.result()).state == VmSnapshotState.REMOVED
    with pytest.raises(SnapferryClientError, match="Removed"):
        await operate(env, req.snapshot_id, REVERT_VM_SNAPSHOT_UPDATE)
    assert len(mocks.named(DELETE_VM_SNAPSHOT)) == 1


async def test_a_failed_take_is_error_with_an_alert_and_a_clear_answer(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    mocks.vm_errors[TAKE_VM_SNAPSHOT] = ApplicationError(
        "VM 'vm1' does not exist on this host", type="VmNotFound", non_retryable=True
    )
    req = vm_request()
    with pytest.raises(SnapferryClientError, match="does not exist"):
        await starter.create_vm_snapshot(env.client, req)
    record = await starter.get_record(env.client, req.snapshot_id, starter.VM)
    assert record.state == VmSnapshotState.ERROR and "does not exist" in (record.error or "")
    assert len(mocks.named(TAKE_VM_SNAPSHOT)) == 1  # permanent: not retried
    assert [a.event for a in mocks.named(RAISE_ALERT)] == ["VMSNAPSHOT.CREATE.FAILED"]
    assert [d.snapshot_id for d in mocks.named(DISCARD_SNAPSHOT)] == [req.snapshot_id]
    with pytest.raises(SnapferryClientError, match="cannot revert"):
        await operate(env, req.snapshot_id, REVERT_VM_SNAPSHOT_UPDATE)
    # An Error snapshot can still be deleted, so that nothing lingers.
    assert (await operate(env, req.snapshot_id, DELETE_VM_SNAPSHOT_UPDATE)).state == "Removed"


async def test_a_refused_revert_leaves_the_snapshot_ready(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    req = vm_request()
    await starter.create_vm_snapshot(env.client, req)
    mocks.vm_errors[REVERT_VM_SNAPSHOT] = ApplicationError(
        "VM 'vm1' is running; stop it before reverting", type="InvalidInput", non_retryable=True
    )
    with pytest.raises(SnapferryClientError, match="is running; stop it"):
        await operate(env, req.snapshot_id, REVERT_VM_SNAPSHOT_UPDATE)
    record = await starter.get_record(env.client, req.snapshot_id, starter.VM)
    assert record.state == VmSnapshotState.READY and record.reverts == 0
    del mocks.vm_errors[REVERT_VM_SNAPSHOT]
    assert (await operate(env, req.snapshot_id, REVERT_VM_SNAPSHOT_UPDATE)).reverts == 1


async def test_a_failed_delete_leaves_error_not_ready(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    """Some disks' layers may be released before the failure: the snapshot is no longer
    whole, so it must not be revertable; only the delete can be sent again."""
    req = vm_request()
    await starter.create_vm_snapshot(env.client, req)
    mocks.vm_errors[DELETE_VM_SNAPSHOT] = ApplicationError(
        "VM 'vm1' has no disk 'vdb'", type="DiskNotFound", non_retryable=True
    )
    with pytest.raises(SnapferryClientError, match="has no disk"):
        await operate(env, req.snapshot_id, DELETE_VM_SNAPSHOT_UPDATE)
    record = await starter.get_record(env.client, req.snapshot_id, starter.VM)
    assert record.state == VmSnapshotState.ERROR and "delete failed" in (record.error or "")
    with pytest.raises(SnapferryClientError, match="cannot revert"):
        await operate(env, req.snapshot_id, REVERT_VM_SNAPSHOT_UPDATE)
    del mocks.vm_errors[DELETE_VM_SNAPSHOT]
    assert (await operate(env, req.snapshot_id, DELETE_VM_SNAPSHOT_UPDATE)).state == "Removed"


async def test_the_take_is_bounded_by_heartbeats(env: WorkflowEnvironment, mocks: Mocks) -> None:
    """A host worker killed during a VM snapshot is noticed within the host heartbeat
    timeout, not at the take's 30-minute bound."""
    from snapferry.workflows.routing import HOST_HEARTBEAT_TIMEOUT

    req = vm_request(VmSnapshotType.DISK_AND_MEMORY)
    await starter.create_vm_snapshot(env.client, req)
    handle = env.client.get_workflow_handle(vm_snapshot_workflow_id(req.snapshot_id))
    history = await handle.fetch_history()
    (take,) = [
        e.activity_task_scheduled_event_attributes
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == TAKE_VM_SNAPSHOT
    ]
    assert take.heartbeat_timeout.ToTimedelta() == HOST_HEARTBEAT_TIMEOUT
    assert take.start_to_close_timeout.ToTimedelta().total_seconds() == 30 * 60
