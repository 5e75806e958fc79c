"""RepositoryJob: one run of a backup repository job (verify, gc, sync) on the backup pool.

A Temporal Schedule starts it (``snapferry repository schedule``), so each run is a
workflow the Web UI lists with its result. A verify that finds damage raises the alert
``REPOSITORY.VERIFY.DAMAGED`` naming every backup it touches, then fails, so the run shows
failed in the UI; a job that fails for good (its retries spent) raises
``REPOSITORY.<JOB>.FAILED``.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from snapferry.activities.contracts import (
        Alert,
        RepositoryJobKind,
        RepositoryJobRequest,
        RepositoryJobResult,
    )
    from snapferry.activities.errors import NON_RETRYABLE_ERROR_TYPES
    from snapferry.activities.names import RUN_REPOSITORY_JOB

from .entity import cause_message, raise_alert
from .routing import BACKUP_QUEUE, REPOSITORY_JOB_WORKFLOW

JOB_RETRY = RetryPolicy(
    maximum_attempts=3,
    initial_interval=timedelta(seconds=10),
    non_retryable_error_types=list(NON_RETRYABLE_ERROR_TYPES),
)


@workflow.defn(name=REPOSITORY_JOB_WORKFLOW)
class RepositoryJobWorkflow:
    @workflow.run
    async def run(self, req: RepositoryJobRequest) -> RepositoryJobResult:
        event = f"REPOSITORY.{req.kind.value.upper()}"
        try:
            result: RepositoryJobResult = await workflow.execute_activity(
                RUN_REPOSITORY_JOB,
                req,
                result_type=RepositoryJobResult,
                task_queue=BACKUP_QUEUE,
                start_to_close_timeout=timedelta(days=1),
                heartbeat_timeout=timedelta(minutes=2),
                retry_policy=JOB_RETRY,
            )
        except ActivityError as err:
            await raise_alert(
                Alert(event=f"{event}.FAILED", message=f"{req.kind.value}: {cause_message(err)}")
            )
            raise ApplicationError(cause_message(err), non_retryable=True) from err
        if not result.ok and req.kind == RepositoryJobKind.VERIFY:
            await raise_alert(
                Alert(
                    event=f"{event}.DAMAGED", message="; ".join([result.summary, *result.damaged])
                )
            )
            raise ApplicationError(result.summary, non_retryable=True)
        return result
