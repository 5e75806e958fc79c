"""What the snapshot entity workflows share: one-at-a-time operations, a long life, alerts.

Each volume snapshot and each VM snapshot is an entity workflow whose ID is the snapshot's
(``volume-snapshot-<id>``, ``vm-snapshot-<id>``). Its state *is* the catalog record: it
survives worker and server restarts (Temporal's history) and continue-as-new (the record is
carried in the new run's input), answers queries, and takes operations as updates, which it
runs one at a time. Listing goes through visibility (search attributes), so it never has to
wake thousands of workflows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any, NoReturn

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from snapferry.activities.contracts import Alert, DiscardRequest, VmRef, validate_name
    from snapferry.activities.errors import NON_RETRYABLE_ERROR_TYPES
    from snapferry.activities.names import DISCARD_SNAPSHOT, RAISE_ALERT

from . import metrics
from .routing import ALERT_QUEUE, HOST_HEARTBEAT_TIMEOUT, host_queue

ALERT_RETRY = RetryPolicy(maximum_attempts=10, maximum_interval=timedelta(minutes=5))


async def raise_alert(alert: Alert) -> None:
    """The alert activity, on its own queue so that it never waits for a backup slot.

    Never raises: an alert that cannot be delivered (a webhook down for longer than its
    retries) must not fail the snapshot it is about; the line is in the worker's log and
    the workflow's history either way."""
    metrics.count("alerts_raised", event=alert.event)
    try:
        await workflow.execute_activity(
            RAISE_ALERT,
            alert,
            task_queue=ALERT_QUEUE,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=ALERT_RETRY,
        )
    except ActivityError as err:
        workflow.logger.error(
            "alert %s for %s could not be delivered: %s",
            alert.event,
            alert.snapshot_id,
            cause_message(err),
        )


def refuse_carried_from_a_caller(carried: bool) -> None:
    """``carried`` is how a run hands its record to the next (continue-as-new); from a
    caller it would skip the take and name any file as the snapshot's primary image, which
    a revert then copies into the VM. So it is accepted on a continued run only."""
    if carried and workflow.info().continued_run_id is None:
        raise ApplicationError(
            "'carried' is set only by snapferry itself when a snapshot continues as new;"
            " a caller must not send it (leave it out, or null)",
            type="InvalidInput",
            non_retryable=True,
        )


def update_id() -> str | None:
    """The running update's ID: Temporal re-delivers updates after a reset with their IDs,
    so host operations key their receipts by it (activities/receipts.py)."""
    info = workflow.current_update_info()
    return info.id if info is not None else None


def cause_message(err: BaseException) -> str:
    """The message an operator needs: the first real failure under Temporal's wrappers.

    It stops at the first ApplicationError, i.e. our typed domain error, rather than at the
    raw Python exception serialised beneath it.
    """
    while isinstance(err, ActivityError | ChildWorkflowError) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, ApplicationError) and err.type:
        return f"{err.type}: {err.message}"
    return str(err)


DISCARD_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
    non_retryable_error_types=NON_RETRYABLE_ERROR_TYPES,
)


DISCARD_FAILED = "what the failed take left on primary could not be removed"


async def discard_take(snapshot_id: str, vm: VmRef, *, vm_snapshot: bool) -> None:
    """Remove what a failed take of this kind left on primary (idempotent: a no-op when
    nothing was made). Raises the ActivityError when it cannot: a delete that runs it fails
    with it."""
    await workflow.execute_activity(
        DISCARD_SNAPSHOT,
        DiscardRequest(snapshot_id=snapshot_id, vm=vm, vm_snapshot=vm_snapshot),
        task_queue=host_queue(vm.host),
        heartbeat_timeout=HOST_HEARTBEAT_TIMEOUT,
        start_to_close_timeout=timedelta(minutes=30),
        retry_policy=DISCARD_RETRY,
    )


async def discard_failed_take(snapshot_id: str, vm: VmRef, *, vm_snapshot: bool) -> str:
    """Remove what a failed take left on primary; '' when done, else why it could not be.

    Never raises: the take already failed, and the alert that follows must still be sent
    (with this outcome in it)."""
    try:
        await discard_take(snapshot_id, vm, vm_snapshot=vm_snapshot)
    except ActivityError as err:
        return f"; {DISCARD_FAILED}: {cause_message(err)}"
    return ""


class EntityWorkflow:
    """Mixin for the entity workflows (call :meth:`_init_entity` from ``__init__``)."""

    kind = "snapshot"

    def _init_entity(self, entity_id: str) -> None:
        self.entity_id = entity_id
        self.op_lock = asyncio.Lock()
        self.busy = False  # an operation holds the entity (see _operation)
        self.destroyed = False

    @contextlib.asynccontextmanager
    async def _operation(self) -> AsyncIterator[None]:
        """Operations on one entity run one at a time, and never after it is destroyed."""
        async with self.op_lock:
            if self.destroyed:
                self._refuse("it was destroyed")
            self.busy = True
            try:
                yield
            finally:
                self.busy = False

    def _validate_host(self, host: str) -> None:
        try:
            validate_name(host)
        except ValueError as err:
            self._refuse(f"cannot move it to host {host!r}: {err}")

    def _refuse(self, message: str) -> NoReturn:
        """A clear, non-retryable "no" for the caller; nothing was changed."""
        raise ApplicationError(f"{self.kind} {self.entity_id}: {message}", type="InvalidInput")

    async def _live_on(self, carry: Callable[[], Any]) -> None:
        """Serve queries and operations until destroyed; when Temporal suggests it, and no
        operation is in flight, continue as new with ``carry()`` (the record carried over)."""
        await workflow.wait_condition(
            lambda: (
                self.destroyed or (workflow.info().is_continue_as_new_suggested() and not self.busy)
            )
        )
        if not self.destroyed:
            await workflow.wait_condition(workflow.all_handlers_finished)
            workflow.continue_as_new(carry())
        await workflow.wait_condition(workflow.all_handlers_finished)
