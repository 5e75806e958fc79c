"""Real continue-as-new on the dev server (a small history limit makes Temporal suggest it):
the record is carried for both kinds of snapshot, listing shows each snapshot once, and
retention counts live snapshots, not runs."""

from __future__ import annotations

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    PolicyInterval,
    SnapshotPolicy,
    SnapshotState,
    VmRef,
    VmSnapshotRecord,
    VmSnapshotRequest,
    VmSnapshotType,
    new_snapshot_id,
)
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workflows.policy import SnapshotPolicyRunWorkflow
from snapferry.workflows.routing import CONTROL_QUEUE, snapshot_workflow_id, vm_snapshot_workflow_id
from snapferry.workflows.snapshot import VERIFY_BACKUP_UPDATE
from snapferry.workflows.vm_snapshot import REVERT_VM_SNAPSHOT_UPDATE

from .helpers import request_for

pytestmark = [
    pytest.mark.integration,
    # Temporal suggests continue-as-new past this many events (server default 4096).
    pytest.mark.dev_server_config(**{"limit.historyCount.suggestContinueAsNew": "40"}),
]


async def until_continued(client: Client, workflow_id: str, poke) -> None:  # type: ignore[no-untyped-def]
    handle = client.get_workflow_handle(workflow_id)
    first_run = (await handle.describe()).run_id
    for _ in range(40):
        await poke()
        if (await handle.describe()).run_id != first_run:
            return
    raise AssertionError(f"{workflow_id} never continued as new")


async def test_records_survive_continue_as_new_and_retention_counts_snapshots_not_runs(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str
) -> None:
    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    policy = "pol-can"
    ids = []
    for _ in range(3):
        req = request_for(vm.name, host_name, settings).model_copy(update={"policy_id": policy})
        answer = await starter.create_snapshot(client, req)
        await starter.wait_settled(client, answer.id)
        ids.append(answer.id)
    oldest = ids[0]
    before = await starter.get_record(client, oldest)

    async def verify() -> None:
        await starter.snapshot_operation(client, oldest, VERIFY_BACKUP_UPDATE, result_type=str)

    await until_continued(client, snapshot_workflow_id(oldest), verify)
    after = await starter.get_record(client, oldest)
    assert after == before and after.state == SnapshotState.BACKED_UP
    rows = await starter.list_snapshots(client, vm=vm.name)
    assert sorted(r["id"] for r in rows) == sorted(ids)  # each once, closed run or not

    # A policy tick: one more snapshot, then keep the newest 2 of the 4, by creation.
    tick = SnapshotPolicy(
        policy_id=policy,
        volume=request_for(vm.name, host_name, settings).volume,
        interval=PolicyInterval.DAILY,
        keep=2,
    )
    deleted = await client.execute_workflow(
        SnapshotPolicyRunWorkflow.run,
        tick,
        id=f"policy-tick-{new_snapshot_id()}",
        task_queue=CONTROL_QUEUE,
    )
    assert sorted(deleted) == sorted(snapshot_workflow_id(i) for i in ids[:2])
    states = {i: (await starter.get_record(client, i)).state for i in ids}
    # Deleted: Hidden while the kept snapshots' deltas need their backups (all of them
    # here: ids[2] is a delta of ids[1], a delta of ids[0]).
    assert states[ids[0]] == states[ids[1]] == SnapshotState.HIDDEN
    assert states[ids[2]] == SnapshotState.BACKED_UP

    # A VM snapshot carries its record the same way (reverts of a stopped VM).
    vm.domain.destroy()
    vm_req = VmSnapshotRequest(
        snapshot_id=new_snapshot_id(),
        vm=VmRef(name=vm.name, host=host_name),
        type=VmSnapshotType.DISK,
    )
    await starter.create_vm_snapshot(client, vm_req)

    async def revert() -> None:
        await starter.snapshot_operation(
            client,
            vm_req.snapshot_id,
            REVERT_VM_SNAPSHOT_UPDATE,
            result_type=VmSnapshotRecord,
            kind=starter.VM,
        )

    await until_continued(client, vm_snapshot_workflow_id(vm_req.snapshot_id), revert)
    carried = await starter.get_record(client, vm_req.snapshot_id, starter.VM)
    assert carried.reverts >= 2 and carried.taken is not None
    await revert()  # the continued run still serves operations on the carried record
    assert (await starter.get_record(client, vm_req.snapshot_id, starter.VM)).reverts == (
        carried.reverts + 1
    )
