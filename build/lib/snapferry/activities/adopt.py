"""Adopt a backup child that already exists: what a reset snapshot workflow does instead of
starting a second backup for the same round.

After ``temporal workflow reset``, the new run reaches the point where the old run started
``backup-<id>-<round>``. That child was abandoned to run on by itself (ParentClosePolicy
ABANDON), so it may still be running, or long finished. Its ID is reused for nothing
(REJECT_DUPLICATE): the start fails, and the new run waits here for the child's own result,
so one round never runs two backups. It runs on the control queue (an async wait, not a copy
slot) and heartbeats while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib

from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from .contracts import BackupResult
from .names import AWAIT_BACKUP_WORKFLOW


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
        raise ApplicationError(
            f"the existing backup {workflow_id} ended without a backup: {message}",
            type=getattr(cause, "type", None) or "BackupFailed",
            non_retryable=True,
        ) from None
    finally:
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats
