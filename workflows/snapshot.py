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
from temporalio.common import (
    RetryPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    WorkflowAlreadyStartedError,
)
from temporalio.workflow import ChildWorkflowHandle, ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from snapferry.activities.contracts import (
        Alert,
        AlertSeverity,
        BackupRequest,
        BackupResult,
        BootCheckOptions,
        HypervisorType,
        PrimarySnapshot,
        ReleaseRequest,
        SnapshotRecord,
        SnapshotRequest,
        SnapshotState,
        StateChange,
        TakeRequest,
    )
    from snapferry.activities.errors import NON_RETRYABLE_ERROR_TYPES
    from snapferry.activities.names import (
        AWAIT_BACKUP_WORKFLOW,
        RELEASE_PRIMARY,
        TAKE_SNAPSHOT,
        VERIFY_BACKUP,
    )

from . import metrics
from .backup import BackupSnapshotWorkflow
from .entity import (
    cause_message,
    discard_failed_take,
    raise_alert,
    refuse_carried_from_a_caller,
)
from .routing import (
    BACKUP_QUEUE,
    CONTROL_QUEUE,
    HOST_HEARTBEAT_TIMEOUT,
    SNAPSHOT_STATE,
    VOLUME_SNAPSHOT_WORKFLOW,
    backup_workflow_id,
    host_queue,
)

# Re-exported as well: callers import every update name and policy from this module.
from .snapshot_common import (  # noqa: F401
    CANCEL_BACKUP_UPDATE,
    DELETE_RELEASE_PATCH,
    DELETE_RETRY_PATCH,
    DELETE_UPDATE,
    DISCARD_ON_DELETE_PATCH,
    DISCARD_PATCH,
    ENTITY_PATCH,
    HIDDEN_PATCH,
    HOST_RETRY,
    ONE_BACKUP_PER_ROUND_PATCH,
    PURGED_SIGNAL,
    RECORD_QUERY,
    RELEASE_BASE_ON_DELETE_PATCH,
    RELEASE_FAILED,
    RESET_OF_DELETED_PATCH,
    RETRY_BACKUP_UPDATE,
    TAKE_HEARTBEAT_PATCH,
    TAKE_LAST_RESORT,
    WAIT_TAKEN_UPDATE,
    search_attributes,
)
from .snapshot_delete import SnapshotDeletion

# Re-exported: callers import every update name and operation policy from this module.
from .snapshot_operations import (  # noqa: F401
    CHECK_BOOT_UPDATE,
    CREATE_TEMPLATE_UPDATE,
    CREATE_VOLUME_UPDATE,
    MOVE_HOST_UPDATE,
    OPERATION_HEARTBEAT_TIMEOUT,
    OPERATION_RETRY,
    REVERT_UPDATE,
    VERIFY_BACKUP_UPDATE,
    SnapshotOperations,
)


@workflow.defn(name=VOLUME_SNAPSHOT_WORKFLOW)
class VolumeSnapshotWorkflow(SnapshotDeletion, SnapshotOperations):
    @workflow.init
    def __init__(self, req: SnapshotRequest) -> None:
        self.req = req
        self.retry_requested = False
        self.backup_round = 0
        self.answer: SnapshotRecord | None = None
        self.answered = False
        self.backup_child: ChildWorkflowHandle | None = None
        self.adopted_backup: str | None = None  # a reset run waits for its old run's child
        self.backup_running = False
        self.deleting = False
        self.cancel_requested = False
        self.purge_seen = False
        self.failed_step: str | None = None  # what a failing delete was doing
        self._init_entity(req.snapshot_id)
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
        if self.record.consistency is not None:
            details += f"\nconsistency: {self.record.consistency.value}"
        if self.record.backup_error:
            details += f"\nlast backup error: {self.record.backup_error}"
        workflow.set_current_details(details)

    async def _alert(self, event: str, message: str, severity: AlertSeverity) -> None:
        await raise_alert(
            Alert(
                event=event,
                severity=severity,
                snapshot_id=self.req.snapshot_id,
                vm=self.record.vm,
                disk=self.record.disk,
                message=message,
            )
        )

    @workflow.run
    async def run(self, req: SnapshotRequest) -> SnapshotRecord:
        refuse_carried_from_a_caller(req.carried is not None)
        if req.carried is not None:
            # Continued as new: the record is carried over, the take and backup are done.
            self.record = req.carried
            self.answer = req.carried
            self.answered = True
            self.backup_round = req.carried.backup_attempts
        elif await self._take(req):
            await self._backup_phase(req)
            if self.record.backup is not None and not self.deleting:
                async with self.op_lock:
                    await self._release(req)
            if req.check_boot and self.record.backup is not None and not self.deleting:
                async with self.op_lock:
                    await self._boot_check(BootCheckOptions())
            if not workflow.patched(ENTITY_PATCH):
                return self.record  # histories from before snapshots stayed open
        elif not self.record.delete_error:
            return self.record  # the take failed and left nothing behind
        # A take that left something on primary lives on too: its delete removes it.
        # The snapshot now lives on as an entity: it answers queries and serves operations
        # (delete, revert, restore, verify) until it is destroyed.
        # self.req, not req: a move_host update may have changed where the VM runs.
        await self._live_on(lambda: self.req.model_copy(update={"carried": self.record}))
        return self.record

    async def _take(self, req: SnapshotRequest) -> bool:
        self.record.created = workflow.now()
        self.record.transitions.append(StateChange(state=self.record.state, at=workflow.now()))
        self._set_state(SnapshotState.CREATING)
        # A VMware take waits for a full clone, whose time grows with the VM: it heartbeats
        # while it polls the clone task, so liveness bounds it, not a 5-minute wall clock
        # (a day stays as a last resort). KVM and XenServer takes are short and do not
        # heartbeat: they keep the old bound.
        take_bound, take_heartbeat = timedelta(minutes=5), None
        if req.volume.vm.hypervisor == HypervisorType.VMWARE and workflow.patched(
            TAKE_HEARTBEAT_PATCH
        ):
            take_bound = TAKE_LAST_RESORT
            take_heartbeat = timedelta(seconds=req.backup.take_heartbeat_timeout_s)
        try:
            primary: PrimarySnapshot = await workflow.execute_activity(
                TAKE_SNAPSHOT,
                TakeRequest(snapshot_id=req.snapshot_id, volume=req.volume, quiesce=req.quiesce),
                result_type=PrimarySnapshot,
                task_queue=host_queue(req.volume.vm.host),
                start_to_close_timeout=take_bound,
                heartbeat_timeout=take_heartbeat,
                retry_policy=HOST_RETRY,
            )
        except ActivityError as err:
            self.record.error = cause_message(err)
            self._set_state(SnapshotState.ERROR)
            left = ""
            if workflow.patched(DISCARD_PATCH):
                left = await discard_failed_take(req.snapshot_id, req.volume.vm, vm_snapshot=False)
                self.record.error += left
            resend = ""
            if left and workflow.patched(DISCARD_ON_DELETE_PATCH):
                # Something may be left in the VM's chain: the workflow stays, owning it,
                # and a delete (allowed by delete_error) runs the discard again.
                self.record.delete_error = left.removeprefix("; ")
                resend = "; delete the snapshot to remove it"
            await self._alert(
                "SNAPSHOT.TAKE.FAILED",
                f"taking snapshot {req.snapshot_id} failed: {self.record.error}{resend}",
                AlertSeverity.ERROR,
            )
            return False
        self.record.primary = primary
        self.record.consistency = primary.consistency
        self._set_state(SnapshotState.CREATED_ON_PRIMARY)
        self.answer = self.record.model_copy(deep=True)
        if self.record.created is not None:
            metrics.observe(
                "answer_latency_seconds",
                (workflow.now() - self.record.created).total_seconds(),
                hypervisor=req.volume.vm.hypervisor.value,
            )
        return True

    async def _backup_phase(self, req: SnapshotRequest) -> None:
        """Back up until it succeeds; after a failure wait for an operator's retry (or a
        delete). Nothing is deleted when a backup fails."""
        primary = self.record.primary
        assert primary is not None
        while not self.deleting:
            self.backup_round += 1
            self.record.backup_attempts = self.backup_round
            self.record.backup_workflow_id = backup_workflow_id(req.snapshot_id, self.backup_round)
            self._set_state(SnapshotState.BACKING_UP)
            vm = req.volume.vm
            self.backup_running = True  # from here until the child is over (see delete)
            try:
                self.backup_child = await self._start_backup_child(req, primary)
            except WorkflowAlreadyStartedError:
                # A reset run: its earlier run started this round's child, which goes on
                # by itself (ABANDON). Wait for that one instead of backing up twice.
                self.adopted_backup = self.record.backup_workflow_id
            hypervisor = vm.hypervisor.value
            metrics.count("backups_started", hypervisor=hypervisor)
            began = workflow.now()
            try:
                result = await self._backup_result()
                if self.adopted_backup is not None and not await self._still_stored(result):
                    # A reset of a deleted snapshot: its backup (and primary copy) are gone,
                    # and nothing is taken or copied again. It stays what it was: Destroyed.
                    self.backup_child, self.adopted_backup, self.backup_running = None, None, False
                    self._set_state(SnapshotState.DESTROYED)
                    self.destroyed = True
                    return
                self.record.backup = result
                self.backup_child, self.adopted_backup, self.backup_running = None, None, False
                self._set_state(SnapshotState.BACKED_UP)
                metrics.count("backups_completed", hypervisor=hypervisor)
                metrics.count("backup_bytes_copied", result.bytes_copied, hypervisor=hypervisor)
                metrics.count("backup_bytes_stored", result.bytes_stored, hypervisor=hypervisor)
                if result.resumed_from > 0 or result.attempts > 1:
                    metrics.count("backup_resumes", hypervisor=hypervisor)
                metrics.observe(
                    "backup_duration_seconds",
                    (workflow.now() - began).total_seconds(),
                    hypervisor=hypervisor,
                )
                return
            except (ChildWorkflowError, ActivityError) as err:
                if self._deleted_before_reset(err):
                    # Its earlier run deleted it: the backup was cancelled (or had failed)
                    # and the primary copy merged away. It stays what it was: Destroyed.
                    self.backup_child, self.adopted_backup, self.backup_running = None, None, False
                    self._set_state(SnapshotState.DESTROYED)
                    self.destroyed = True
                    return
                if not self.cancel_requested and not self.deleting:
                    metrics.count("backups_failed", hypervisor=hypervisor)
                self.backup_child, self.adopted_backup, self.backup_running = None, None, False
                self.record.backup_error = (
                    "backup cancelled by an operator"
                    if self.cancel_requested
                    else cause_message(err)
                )
                self.cancel_requested = False
                self._set_state(SnapshotState.CREATED_ON_PRIMARY)
                await workflow.wait_condition(lambda: self.retry_requested or self.deleting)
                self.retry_requested = False
                if not self.deleting:
                    self.record.backup_error = None

    def _deleted_before_reset(self, err: Exception) -> bool:
        """An adopted backup (a reset run's) that ended without a backup because an earlier
        run of this snapshot deleted it (see activities/adopt.py)."""
        cause = err.cause if isinstance(err, ActivityError) else None
        return (
            self.adopted_backup is not None
            and isinstance(cause, ApplicationError)
            and cause.type == "SnapshotDeleted"
            and workflow.patched(RESET_OF_DELETED_PATCH)
        )

    async def _start_backup_child(
        self, req: SnapshotRequest, primary: PrimarySnapshot
    ) -> ChildWorkflowHandle:
        """This round's backup child. Its ID is never reused (a reset run must not start a
        second backup for a round its earlier run started): the start then fails with
        WorkflowAlreadyStartedError. Histories from before that rule replay without it."""
        vm = req.volume.vm
        once = workflow.patched(ONE_BACKUP_PER_ROUND_PATCH)
        assert self.record.backup_workflow_id is not None
        return await workflow.start_child_workflow(
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
            id_reuse_policy=(
                WorkflowIDReusePolicy.REJECT_DUPLICATE
                if once
                else WorkflowIDReusePolicy.ALLOW_DUPLICATE
            ),
            search_attributes=search_attributes(req, SnapshotState.BACKING_UP),
            static_summary=(
                f"Backup of {vm.name}/{req.volume.disk} snapshot {req.snapshot_id}"
                f" ({primary.virtual_size // (1024 * 1024)} MiB, round"
                f" {self.backup_round})"
            ),
        )

    async def _still_stored(self, result: BackupResult) -> bool:
        """Whether an adopted backup is still on secondary (re-read and checked)."""
        try:
            await workflow.execute_activity(
                VERIFY_BACKUP,
                result.manifest_path,
                task_queue=BACKUP_QUEUE,
                start_to_close_timeout=timedelta(hours=12),
                heartbeat_timeout=timedelta(seconds=60),
                retry_policy=OPERATION_RETRY,
            )
        except ActivityError as err:
            cause = err.cause
            if isinstance(cause, ApplicationError) and "does not exist" in cause.message:
                return False  # verify_backup's InvalidInput: "backup manifest ... does not exist"
            raise
        return True

    async def _backup_result(self) -> BackupResult:
        if self.backup_child is not None:
            result: BackupResult = await self.backup_child
            return result
        assert self.adopted_backup is not None
        adopted: BackupResult = await workflow.execute_activity(
            AWAIT_BACKUP_WORKFLOW,
            self.adopted_backup,
            result_type=BackupResult,
            task_queue=CONTROL_QUEUE,
            start_to_close_timeout=timedelta(days=8),
            heartbeat_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(non_retryable_error_types=NON_RETRYABLE_ERROR_TYPES),
        )
        return adopted

    async def _release(self, req: SnapshotRequest, *, deleting: bool = False) -> None:
        """After the verified backup (the primary copy may be kept as the next delta's
        base), or on the delete (``deleting``: it goes whatever it was kept for)."""
        primary = self.record.primary
        assert primary is not None
        try:
            await workflow.execute_activity(
                RELEASE_PRIMARY,
                ReleaseRequest(
                    snapshot_id=req.snapshot_id,
                    volume=req.volume,
                    source=primary,
                    backed_up=self.record.backup is not None and not deleting,
                ),
                task_queue=host_queue(req.volume.vm.host),
                heartbeat_timeout=HOST_HEARTBEAT_TIMEOUT,
                start_to_close_timeout=timedelta(minutes=30),
                retry_policy=HOST_RETRY,
            )
            self.record.primary_released = True
        except ActivityError as err:
            if deleting and workflow.patched(DELETE_RELEASE_PATCH):
                # The snapshot's layer may still be in the chain: the delete fails and is
                # sent again, and the workflow keeps owning the layer until it goes.
                self.failed_step = RELEASE_FAILED
                raise
            # The backup is safe; only primary space is held longer. Tell the operator.
            await self._alert(
                "SNAPSHOT.RELEASE.FAILED",
                f"snapshot {req.snapshot_id} is backed up but its primary copy could not be"
                f" merged yet: {cause_message(err)}",
                AlertSeverity.WARNING,
            )

    @workflow.update(name=WAIT_TAKEN_UPDATE)
    async def wait_taken(self) -> SnapshotRecord:
        """The caller's answer: the record as it was when the take completed."""
        await workflow.wait_condition(
            lambda: self.answer is not None or self.record.state == SnapshotState.ERROR
        )
        if self.answer is None:
            raise ApplicationError(self.record.error or "take failed", type="TakeFailed")
        if self.answered:
            return self.record  # a repeated create of this ID: the record as it is now
        self.answered = True
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

    @workflow.update(name=CANCEL_BACKUP_UPDATE)
    async def cancel_backup(self) -> SnapshotRecord:
        self.cancel_requested = True
        if self.backup_child is not None:
            self.backup_child.cancel()
        else:
            assert self.adopted_backup is not None
            await workflow.get_external_workflow_handle(self.adopted_backup).cancel()
        await workflow.wait_condition(lambda: not self.backup_running)
        return self.record

    @cancel_backup.validator
    def _validate_cancel(self) -> None:
        if (self.backup_child is None and self.adopted_backup is None) or self.deleting:
            self._refuse(f"no backup is running (it is {self.record.state.value})")

    @workflow.query(name=RECORD_QUERY)
    def get_record(self) -> SnapshotRecord:
        return self.record
