"""VmSnapshot: a VM snapshot (every disk at one point, optionally with memory) as an entity.

Callers create it with update-with-start on ``wait_created`` and get the record in Ready (or
the take's error). The workflow then lives on as the snapshot's catalog entry, taking
``revert`` and ``delete`` as updates, one at a time, with CloudStack's ``VMSnapshot.State``
names: Allocated -> Creating -> Ready (-> Reverting -> Ready)* -> Expunging -> Removed.

VM snapshots are never backed up: like CloudStack's they live on primary storage. They
coexist with volume snapshots because both are layers of one disk chain that the host driver
only merges where every owner of a layer has let go (docs/hypervisors/kvm.md, coexistence
rules).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from snapferry.activities.contracts import (
        Alert,
        AlertSeverity,
        VmSnapshotOperation,
        VmSnapshotRecord,
        VmSnapshotRequest,
        VmSnapshotState,
        VmSnapshotTaken,
        VmStateChange,
    )
    from snapferry.activities.names import (
        DELETE_VM_SNAPSHOT,
        REVERT_VM_SNAPSHOT,
        SNAPSHOT_RECORD_QUERY,
        TAKE_VM_SNAPSHOT,
        VM_SNAPSHOT_DELETED,
    )

from .entity import (
    EntityWorkflow,
    cause_message,
    discard_failed_take,
    raise_alert,
    refuse_carried_from_a_caller,
    update_id,
)
from .routing import (
    HOST_HEARTBEAT_TIMEOUT,
    HYPERVISOR,
    SNAPSHOT_ID,
    SNAPSHOT_STATE,
    VM_ID,
    VM_SNAPSHOT_WORKFLOW,
    host_queue,
)
from .snapshot import HOST_RETRY, MOVE_HOST_UPDATE, OPERATION_RETRY

WAIT_CREATED_UPDATE = "wait_created"
REVERT_VM_SNAPSHOT_UPDATE = "revert_vm_snapshot"
DELETE_VM_SNAPSHOT_UPDATE = "delete_vm_snapshot"
VM_RECORD_QUERY = SNAPSHOT_RECORD_QUERY
RESET_OF_REMOVED_PATCH = "reset-of-a-removed-vm-snapshot"
# The take heartbeats (the host activity beats while the driver works), so a host worker
# killed during a take is noticed within HOST_HEARTBEAT_TIMEOUT, not at its 30-minute bound.
TAKE_HEARTBEAT_PATCH = "vm-snapshot-take-bounded-by-heartbeats"


def vm_search_attributes(req: VmSnapshotRequest, state: VmSnapshotState) -> TypedSearchAttributes:
    return TypedSearchAttributes(
        [
            SearchAttributePair(VM_ID, req.vm.name),
            SearchAttributePair(SNAPSHOT_ID, req.snapshot_id),
            SearchAttributePair(SNAPSHOT_STATE, state.value),
            SearchAttributePair(HYPERVISOR, req.vm.hypervisor.value),
        ]
    )


@workflow.defn(name=VM_SNAPSHOT_WORKFLOW)
class VmSnapshotWorkflow(EntityWorkflow):
    kind = "VM snapshot"

    @workflow.init
    def __init__(self, req: VmSnapshotRequest) -> None:
        self.req = req
        self.answered = False
        self.record = VmSnapshotRecord(
            id=req.snapshot_id,
            state=VmSnapshotState.ALLOCATED,
            vm=req.vm.name,
            host=req.vm.host,
            hypervisor=req.vm.hypervisor,
            type=req.type,
            name=req.name,
        )
        self._init_entity(req.snapshot_id)

    def _set_state(self, state: VmSnapshotState) -> None:
        self.record.state = state
        self.record.transitions.append(VmStateChange(state=state, at=workflow.now()))
        workflow.upsert_search_attributes([SNAPSHOT_STATE.value_set(state.value)])
        details = f"{self.record.vm} ({self.record.type.value}): {state.value}"
        if self.record.consistency is not None:
            details += f"\nconsistency: {self.record.consistency.value}"
        if self.record.error:
            details += f"\nlast error: {self.record.error}"
        workflow.set_current_details(details)

    def _operation_input(self) -> VmSnapshotOperation:
        return VmSnapshotOperation(
            snapshot_id=self.req.snapshot_id,
            vm=self.req.vm,
            type=self.req.type,
            taken=self.record.taken,
            quiesce=self.req.quiesce,
        )

    @workflow.run
    async def run(self, req: VmSnapshotRequest) -> VmSnapshotRecord:
        refuse_carried_from_a_caller(req.carried is not None)
        if req.carried is not None:
            self.record, self.answered = req.carried, True
        else:
            self.record.created = workflow.now()
            self.record.transitions.append(
                VmStateChange(state=self.record.state, at=self.record.created)
            )
            self._set_state(VmSnapshotState.CREATING)
            try:
                take_heartbeat = (
                    HOST_HEARTBEAT_TIMEOUT if workflow.patched(TAKE_HEARTBEAT_PATCH) else None
                )
                self.record.taken = await workflow.execute_activity(
                    TAKE_VM_SNAPSHOT,
                    self._operation_input(),
                    result_type=VmSnapshotTaken,
                    task_queue=host_queue(req.vm.host),
                    # A memory snapshot pauses the VM while its RAM is written out.
                    start_to_close_timeout=timedelta(minutes=30),
                    heartbeat_timeout=take_heartbeat,
                    retry_policy=HOST_RETRY,
                )
                self.record.consistency = self.record.taken.consistency
                if workflow.patched(RESET_OF_REMOVED_PATCH) and await workflow.execute_activity(
                    VM_SNAPSHOT_DELETED,
                    self._operation_input(),
                    result_type=bool,
                    task_queue=host_queue(req.vm.host),
                    start_to_close_timeout=timedelta(minutes=1),
                    retry_policy=HOST_RETRY,
                ):
                    # A reset run of a VM snapshot deleted since: it stays Removed.
                    self._set_state(VmSnapshotState.REMOVED)
                    self.destroyed = True
                    return self.record
                self._set_state(VmSnapshotState.READY)
            except ActivityError as err:
                if (
                    isinstance(err.cause, ApplicationError)
                    and err.cause.type == "SnapshotDeleted"
                    and workflow.patched(RESET_OF_REMOVED_PATCH)
                ):
                    # A reset of a deleted VM snapshot: it stays what it was.
                    self._set_state(VmSnapshotState.REMOVED)
                    self.destroyed = True
                    return self.record
                self.record.error = cause_message(err)
                self.record.error += await discard_failed_take(
                    req.snapshot_id, req.vm, vm_snapshot=True
                )
                self._set_state(VmSnapshotState.ERROR)
                await raise_alert(
                    Alert(
                        event="VMSNAPSHOT.CREATE.FAILED",
                        severity=AlertSeverity.ERROR,
                        snapshot_id=req.snapshot_id,
                        vm=req.vm.name,
                        message=f"VM snapshot {req.snapshot_id} of {req.vm.name} failed:"
                        f" {self.record.error}",
                    )
                )
        # self.req, not req: a move_host update may have changed where the VM runs.
        await self._live_on(lambda: self.req.model_copy(update={"carried": self.record}))
        return self.record

    @workflow.update(name=WAIT_CREATED_UPDATE)
    async def wait_created(self) -> VmSnapshotRecord:
        """The caller's answer: the record once the snapshot is Ready (or the take failed)."""
        await workflow.wait_condition(
            lambda: self.record.state not in (VmSnapshotState.ALLOCATED, VmSnapshotState.CREATING)
        )
        if self.record.state == VmSnapshotState.ERROR and not self.answered:
            self.answered = True
            raise ApplicationError(self.record.error or "take failed", type="TakeFailed")
        self.answered = True
        return self.record

    @workflow.update(name=REVERT_VM_SNAPSHOT_UPDATE)
    async def revert(self) -> VmSnapshotRecord:
        """Revert the VM to this snapshot. Disk: the VM must be stopped, and stays stopped.
        DiskAndMemory: the VM ends running, resumed from the snapshot's memory."""
        async with self._operation():
            self._set_state(VmSnapshotState.REVERTING)
            try:
                await workflow.execute_activity(
                    REVERT_VM_SNAPSHOT,
                    self._operation_input().model_copy(update={"operation_id": update_id()}),
                    task_queue=host_queue(self.req.vm.host),
                    heartbeat_timeout=HOST_HEARTBEAT_TIMEOUT,
                    start_to_close_timeout=timedelta(hours=12),
                    retry_policy=OPERATION_RETRY,
                )
                self.record.reverts += 1
            finally:
                # A failed revert changed nothing the snapshot needs: it stays usable.
                self._set_state(VmSnapshotState.READY)
        return self.record

    @revert.validator
    def _validate_revert(self) -> None:
        if self.record.state != VmSnapshotState.READY or self.destroyed:
            self._refuse(f"cannot revert to it while it is {self.record.state.value}")

    @workflow.update(name=DELETE_VM_SNAPSHOT_UPDATE)
    async def delete(self) -> VmSnapshotRecord:
        """Give its layers back to the chain (merged where nothing else needs them) and
        remove its memory file."""
        async with self._operation():
            before = self.record.state
            self._set_state(VmSnapshotState.EXPUNGING)
            try:
                await workflow.execute_activity(
                    DELETE_VM_SNAPSHOT,
                    self._operation_input(),
                    task_queue=host_queue(self.req.vm.host),
                    heartbeat_timeout=HOST_HEARTBEAT_TIMEOUT,
                    start_to_close_timeout=timedelta(minutes=30),
                    retry_policy=HOST_RETRY,
                )
            except ActivityError as err:
                # Some disks' layers may be released already: the snapshot is no longer
                # whole, so it must not look Ready (a revert would find layers merged
                # away). Error allows only the delete, which can be sent again.
                self.record.error = f"delete failed: {cause_message(err)}"
                self._set_state(
                    VmSnapshotState.ERROR if before == VmSnapshotState.READY else before
                )
                raise
            self._set_state(VmSnapshotState.REMOVED)
            self.destroyed = True
        return self.record

    @delete.validator
    def _validate_delete(self) -> None:
        if self.record.state not in (VmSnapshotState.READY, VmSnapshotState.ERROR):
            self._refuse(f"cannot delete it while it is {self.record.state.value}")

    @workflow.update(name=MOVE_HOST_UPDATE)
    def move_host(self, host: str) -> VmSnapshotRecord:
        """The VM now runs on ``host`` (see VolumeSnapshot.move_host)."""
        self.req.vm.host = host
        self.record.host = host
        return self.record

    @move_host.validator
    def _validate_move_host(self, host: str) -> None:
        self._validate_host(host)

    @workflow.query(name=VM_RECORD_QUERY)
    def get_record(self) -> VmSnapshotRecord:
        return self.record
