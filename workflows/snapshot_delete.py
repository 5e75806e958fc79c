"""Deleting a volume snapshot: cancel a running backup, delete on secondary (chain-aware:
a backup later deltas need is kept, the snapshot Hidden), then give the primary copy back.
A delete that fails leaves the snapshot in Error with ``delete_error``, and it can be sent
again; VolumeSnapshotWorkflow (workflows/snapshot.py) inherits these handlers."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.workflow import ChildWorkflowHandle

with workflow.unsafe.imports_passed_through():
    from snapferry.activities.contracts import (
        AlertSeverity,
        DeleteBackupOutcome,
        DeleteBackupRequest,
        SnapshotRecord,
        SnapshotRequest,
        SnapshotState,
    )
    from snapferry.activities.names import DELETE_BACKUP

from .entity import DISCARD_FAILED, EntityWorkflow, cause_message, discard_take
from .routing import BACKUP_QUEUE, snapshot_workflow_id
from .snapshot_common import (
    DELETE_RETRY_PATCH,
    DELETE_UPDATE,
    HIDDEN_PATCH,
    HOST_RETRY,
    PURGED_SIGNAL,
    RELEASE_BASE_ON_DELETE_PATCH,
)


class SnapshotDeletion(EntityWorkflow):
    """The delete update and the purge signal; the workflow that inherits them sets the
    state below and gives :meth:`_release`, :meth:`_set_state` and :meth:`_alert`."""

    req: SnapshotRequest
    record: SnapshotRecord
    deleting: bool
    backup_child: ChildWorkflowHandle | None
    adopted_backup: str | None
    backup_running: bool
    purge_seen: bool
    failed_step: str | None

    async def _release(self, req: SnapshotRequest, *, deleting: bool = False) -> None:
        raise NotImplementedError  # the workflow's own (workflows/snapshot.py)

    def _set_state(self, state: SnapshotState) -> None:
        raise NotImplementedError

    async def _alert(self, event: str, message: str, severity: AlertSeverity) -> None:
        raise NotImplementedError

    @workflow.update(name=DELETE_UPDATE)
    async def delete_snapshot(self) -> SnapshotRecord:
        """Delete on secondary and primary. A running backup is cancelled first (its
        ``.partial`` files are removed); a snapshot still on primary is merged away."""
        self.deleting = True
        # A backup being started has no handle yet: wait for it, then cancel it.
        await workflow.wait_condition(
            lambda: (
                self.backup_child is not None
                or self.adopted_backup is not None
                or not self.backup_running
            )
        )
        if self.backup_child is not None:
            self.backup_child.cancel()
        elif self.adopted_backup is not None:
            await workflow.get_external_workflow_handle(self.adopted_backup).cancel()
        await workflow.wait_condition(lambda: not self.backup_running)
        async with self._operation():
            try:
                return await self._delete_everywhere()
            except ActivityError as err:
                if not workflow.patched(DELETE_RETRY_PATCH):
                    raise  # histories from before a failed delete could be sent again
                # The store may have lost some files already (manifest first, so nothing
                # looks whole that is not): the snapshot is Error, the delete can be sent
                # again, and nothing else is allowed until it succeeds.
                self.deleting = False
                cause = cause_message(err)
                self.record.delete_error = (
                    f"{self.failed_step}: {cause}" if self.failed_step else cause
                )
                self.failed_step = None
                self._set_state(SnapshotState.ERROR)
                await self._alert(
                    "SNAPSHOT.DELETE.FAILED",
                    f"deleting snapshot {self.req.snapshot_id} failed:"
                    f" {self.record.delete_error}; send the delete again",
                    AlertSeverity.ERROR,
                )
                raise ApplicationError(
                    f"snapshot {self.req.snapshot_id}: delete failed:"
                    f" {self.record.delete_error}; it is Error now, send the delete again",
                    type="DeleteFailed",
                    non_retryable=True,
                ) from err

    async def _delete_everywhere(self) -> SnapshotRecord:
        """The delete proper: secondary first (chain-aware), then primary."""
        self._set_state(SnapshotState.DESTROYING)
        if self.record.primary is None:
            # A take that failed and whose leftovers could not be removed then (only such
            # a snapshot without a primary copy passes the validator): remove them now.
            self.failed_step = DISCARD_FAILED
            await discard_take(self.req.snapshot_id, self.req.volume.vm, vm_snapshot=False)
            self.failed_step = None
        if self.record.primary is not None:
            # Whatever a backup left (finished, or cancelled mid-way), by the store's
            # own layout: a backup that finished just as it was cancelled is included.
            outcome: DeleteBackupOutcome | None = await workflow.execute_activity(
                DELETE_BACKUP,
                DeleteBackupRequest(snapshot_id=self.req.snapshot_id, volume=self.req.volume),
                result_type=DeleteBackupOutcome | None,  # type: ignore[arg-type]
                task_queue=BACKUP_QUEUE,
                start_to_close_timeout=timedelta(minutes=10),
                retry_policy=HOST_RETRY,
            )
        else:
            outcome = None
        if self.record.primary is not None and not self.record.primary_released:
            # A delete: whatever the backup did, the primary copy goes (never kept as the
            # next delta's base for a snapshot that is being deleted).
            await self._release(self.req, deleting=True)
        elif (
            self.record.primary is not None
            and self.record.backup is not None
            and workflow.patched(RELEASE_BASE_ON_DELETE_PATCH)
        ):
            await self._release(self.req, deleting=True)
        if outcome is not None and workflow.patched(HIDDEN_PATCH):
            for parent in outcome.purged:  # hidden ancestors nothing needs any more
                await workflow.get_external_workflow_handle(snapshot_workflow_id(parent)).signal(
                    PURGED_SIGNAL
                )
            if outcome.hidden and not self.purge_seen:
                # Later deltas need this backup: Hidden, as in CloudStack, until the
                # delete of its last dependant purges it.
                self._set_state(SnapshotState.HIDDEN)
                return self.record
        self._set_state(SnapshotState.DESTROYED)
        self.destroyed = True
        return self.record

    @workflow.signal(name=PURGED_SIGNAL)
    def purged(self) -> None:
        """Sent by the delete that removed this Hidden snapshot's backup with its own. It
        may arrive while this snapshot's own delete is still finishing: remembered."""
        self.purge_seen = True
        if self.record.state == SnapshotState.HIDDEN:
            self._set_state(SnapshotState.DESTROYED)
            self.destroyed = True

    @delete_snapshot.validator
    def _validate_delete(self) -> None:
        if self.record.state == SnapshotState.ERROR and self.record.delete_error:
            return  # a failed delete is sent again
        if self.record.state == SnapshotState.HIDDEN:
            self._refuse(
                "it is Hidden: deleted, but its backup is kept until the later deltas that"
                " depend on it are deleted"
            )
        if self.deleting or self.record.state in (
            SnapshotState.ALLOCATED,
            SnapshotState.CREATING,
            SnapshotState.ERROR,
        ):
            self._refuse(f"cannot delete it while it is {self.record.state.value}")
