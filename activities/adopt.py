"""Adopt a backup child that already exists: what a reset snapshot workflow does instead of
starting a second backup for the same round.

After ``temporal workflow reset``, the new run reaches the point where the old run started
``backup-<id>-<round>``. That child was abandoned to run on by itself (ParentClosePolicy
ABANDON), so it may still be running, or long finished. Its ID is reused for nothing
(REJECT_DUPLICATE): the start fails, and the new run waits here for the child's own result,
so one round never runs two backups. It runs on the control queue (an async wait, not a copy
slot) and heartbeats while it waits.

A child that ended without a backup may have been cancelled by the snapshot's delete (or
failed before one). The reset run must then stay deleted, not wait for a retry of a backup
whose primary copy was merged away: an earlier run of the same snapshot that visibility
shows Destroyed (or Hidden) makes this a ``SnapshotDeleted`` error.
"""

from __future__ import annotations

import asyncio
import contextlib

from temporalio import activity
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ApplicationError

from .contracts import BackupResult
from .names import AWAIT_BACKUP_WORKFLOW, DELETED_STATES, SNAPSHOT_STATE_ATTRIBUTE

_STATE = SearchAttributeKey.for_keyword(SNAPSHOT_STATE_ATTRIBUTE)


async def deleted_before(client: Client) -> str | None:
    """The state an earlier run of the calling snapshot workflow ended deleted in, if any."""
    info = activity.info()
    async for wf in client.list_workflows(f'WorkflowId = "{info.workflow_id}"'):
        state = wf.typed_search_attributes.get(_STATE)
        if wf.run_id != info.workflow_run_id and state in DELETED_STATES:
            return state
    return None


@activity.defn(name=AWAIT_BACKUP_WORKFLOW)
async def await_backup_workflow(workflow_id: str) -> BackupResult:
    handle = activity.client().get_workflow_handle(workflow_id, result_type=BackupResult)

    async def heartbeat() -> None:
        while True:
            activity.heartbeat()
            await asyncio.sleep(2)

    beats = asyncio.create_task(heartbeat())
    try:
        return await handle.result(follow_runs=False)
    except WorkflowFailureError as err:
        cause = err.cause
        message = getattr(cause, "message", None) or str(cause)
        state = await deleted_before(activity.client())
        if state is not None:
            raise ApplicationError(
                f"the existing backup {workflow_id} ended without a backup ({message}), and"
                f" an earlier run of this snapshot ended {state}: it was deleted",
                type="SnapshotDeleted",
                non_retryable=True,
            ) from None
        raise ApplicationError(
            f"the existing backup {workflow_id} ended without a backup: {message}",
            type=getattr(cause, "type", None) or "BackupFailed",
            non_retryable=True,
        ) from None
    finally:
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats
