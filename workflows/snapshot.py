"""VolumeSnapshot: take -> answer the caller -> back up -> release primary.

Callers start it with update-with-start on the ``wait_taken`` update, so they get their answer
(the record in CreatedOnPrimary) as soon as the take is done, never by polling, and the same
snapshot ID always maps to the same workflow (idempotent create). The backup then runs as a
child on the backup queue; while it runs the snapshot is BackingUp, and the VM is free.

If the backup fails for good, the snapshot goes back to CreatedOnPrimary with the failure in
its record, nothing is deleted, and the workflow waits for the ``retry_backup`` update.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.contracts import (
        Alert,
        AlertSeverity,
        BackupRequest,
        BackupResult,
        PrimarySnapshot,
        ReleaseRequest,
        SnapshotRecord,
        SnapshotRequest,
        SnapshotState,
        StateChange,
        TakeRequest,
    )
    from activities.errors import NON_RETRYABLE_ERROR_TYPES
    from activities.names import RAISE_ALERT, RELEASE_PRIMARY, TAKE_SNAPSHOT

from .backup import ALERT_RETRY, BackupSnapshotWorkflow, cause_message
from .routing import (
    ALERT_QUEUE,
    BACKUP_QUEUE,
    HYPERVISOR,
    SNAPSHOT_ID,
    SNAPSHOT_STATE,
    VM_ID,
    VOLUME_ID,
    VOLUME_SNAPSHOT_WORKFLOW,
    backup_workflow_id,
    host_queue,
    volume_id,
)

HOST_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
    non_retryable_error_types=NON_RETRYABLE_ERROR_TYPES,
)

WAIT_TAKEN_UPDATE = "wait_taken"
RETRY_BACKUP_UPDATE = "retry_backup"
RECORD_QUERY = "record"


def search_attributes(req: SnapshotRequest, state: SnapshotState) -> TypedSearchAttributes:
    vm = req.volume.vm
    return TypedSearchAttributes(
        [
            SearchAttributePair(VOLUME_ID, volume_id(vm.name, req.volume.disk)),
            SearchAttributePair(VM_ID, vm.name),
            SearchAttributePair(SNAPSHOT_ID, req.snapshot_id),
            SearchAttributePair(SNAPSHOT_STATE, state.value),
            SearchAttributePair(HYPERVISOR, vm.hypervisor.value),
        ]
    )


@workflow.defn(name=VOLUME_SNAPSHOT_WORKFLOW)
class VolumeSnapshotWorkflow:
    @workflow.init
    def __init__(self, req: SnapshotRequest) -> None:
        self.req = req
        self.retry_requested = False
        self.backup_round = 0
        self.answer: SnapshotRecord | None = None
        self.record = SnapshotRecord(
            id=req.snapshot_id,
            state=SnapshotState.ALLOCATED,
            vm=req.volume.vm.name,
            disk=req.volume.disk,
            host=req.volume.vm.host,
            hypervisor=req.volume.vm.hypervisor,
        )

    def _set_state(self, state: SnapshotState) -> None:
        self.record.state = state
        self.record.transitions.append(StateChange(state=state, at=workflow.now()))
        workflow.upsert_search_attributes([SNAPSHOT_STATE.value_set(state.value)])
        details = f"{self.record.vm}/{self.record.disk}: {state.value}"
        if self.record.backup_error:
            details += f"\nlast backup error: {self.record.backup_error}"
        workflow.set_current_details(details)

    async def _alert(self, event: str, message: str, severity: AlertSeverity) -> None:
        await workflow.execute_activity(
            RAISE_ALERT,
            Alert(
                event=event,
                severity=severity,
                snapshot_id=self.req.snapshot_id,
                vm=self.record.vm,
                disk=self.record.disk,
                message=message,
            ),
            task_queue=ALERT_QUEUE,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=ALERT_RETRY,
        )

    @workflow.run
    async def run(self, req: SnapshotRequest) -> SnapshotRecord:
        self.record.created = workflow.now()
        self.record.transitions.append(StateChange(state=self.record.state, at=workflow.now()))
        self._set_state(SnapshotState.CREATING)
        queue = host_queue(req.volume.vm.host)
        try:
            primary: PrimarySnapshot = await workflow.execute_activity(
                TAKE_SNAPSHOT,
                TakeRequest(snapshot_id=req.snapshot_id, volume=req.volume),
                result_type=PrimarySnapshot,
                task_queue=queue,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=HOST_RETRY,
            )
        except ActivityError as err:
            self.record.error = cause_message(err)
            self._set_state(SnapshotState.ERROR)
            await self._alert(
                "SNAPSHOT.TAKE.FAILED",
                f"taking snapshot {req.snapshot_id} failed: {self.record.error}",
                AlertSeverity.ERROR,
            )
            return self.record
        self.record.primary = primary
        self._set_state(SnapshotState.CREATED_ON_PRIMARY)
        self.answer = self.record.model_copy(deep=True)

        result = await self._backup_until_done(req, primary)
        self.record.backup = result
        self._set_state(SnapshotState.BACKED_UP)

        try:
            await workflow.execute_activity(
                RELEASE_PRIMARY,
                ReleaseRequest(snapshot_id=req.snapshot_id, volume=req.volume, source=primary),
                task_queue=queue,
                start_to_close_timeout=timedelta(minutes=30),
                retry_policy=HOST_RETRY,
            )
            self.record.primary_released = True
        except ActivityError as err:
            # The backup is safe; only primary space is held longer. Tell the operator.
            await self._alert(
                "SNAPSHOT.RELEASE.FAILED",
                f"snapshot {req.snapshot_id} is backed up but its primary copy could not be"
                f" merged yet: {cause_message(err)}",
                AlertSeverity.WARNING,
            )
        return self.record

    async def _backup_until_done(
        self, req: SnapshotRequest, primary: PrimarySnapshot
    ) -> BackupResult:
        while True:
            self.backup_round += 1
            self.record.backup_attempts = self.backup_round
            self.record.backup_workflow_id = backup_workflow_id(req.snapshot_id, self.backup_round)
            self._set_state(SnapshotState.BACKING_UP)
            vm = req.volume.vm
            try:
                return await workflow.execute_child_workflow(
                    BackupSnapshotWorkflow.run,
                    BackupRequest(
                        snapshot_id=req.snapshot_id,
                        volume=req.volume,
                        source=primary,
                        options=req.backup,
                        round=self.backup_round,
                    ),
                    id=self.record.backup_workflow_id,
                    task_queue=BACKUP_QUEUE,
                    parent_close_policy=ParentClosePolicy.ABANDON,
                    search_attributes=search_attributes(req, SnapshotState.BACKING_UP),
                    static_summary=(
                        f"Backup of {vm.name}/{req.volume.disk} snapshot {req.snapshot_id}"
                        f" ({primary.virtual_size // (1024 * 1024)} MiB, round"
                        f" {self.backup_round})"
                    ),
                )
            except ChildWorkflowError as err:
                self.record.backup_error = cause_message(err)
                self._set_state(SnapshotState.CREATED_ON_PRIMARY)
                await workflow.wait_condition(lambda: self.retry_requested)
                self.retry_requested = False
                self.record.backup_error = None

    @workflow.update(name=WAIT_TAKEN_UPDATE)
    async def wait_taken(self) -> SnapshotRecord:
        """The caller's answer: the record as it was when the take completed."""
        await workflow.wait_condition(
            lambda: self.answer is not None or self.record.state == SnapshotState.ERROR
        )
        if self.answer is None:
            raise ApplicationError(self.record.error or "take failed", type="TakeFailed")
        return self.answer

    @workflow.update(name=RETRY_BACKUP_UPDATE)
    def retry_backup(self) -> SnapshotRecord:
        self.retry_requested = True
        return self.record

    @retry_backup.validator
    def _validate_retry(self) -> None:
        if self.record.state != SnapshotState.CREATED_ON_PRIMARY or not self.record.backup_error:
            raise ApplicationError(
                f"snapshot {self.req.snapshot_id} is {self.record.state.value}; only a"
                " snapshot whose backup failed (CreatedOnPrimary with an error) can be retried",
                type="InvalidInput",
            )

    @workflow.query(name=RECORD_QUERY)
    def get_record(self) -> SnapshotRecord:
        return self.record
