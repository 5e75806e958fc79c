"""The backup repository's jobs on Temporal Schedules: verify, gc and sync, each at most one.

Each job kind has one schedule (``repository-verify``, ``-gc``, ``-sync``) whose action starts
a RepositoryJob workflow on the control queue; the job itself runs on a backup worker. The
overlap policy is SKIP, as for snapshot policies: a verify still reading a large repository
when the next tick comes is not run twice at once. Each run is a workflow in the Web UI, its
result (or the alert it raised) kept in its history.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from temporalio.api.common.v1 import Payload
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
)

from snapferry.activities.contracts import (
    RepositoryJobKind,
    RepositoryJobRequest,
    RepositoryJobResult,
)
from snapferry.workflows.repository import RepositoryJobWorkflow
from snapferry.workflows.routing import CONTROL_QUEUE, repository_schedule_id

from .starter import SnapferryClientError

EVERY = {"hourly": timedelta(hours=1), "daily": timedelta(days=1), "weekly": timedelta(days=7)}


async def schedule_job(
    client: Client, req: RepositoryJobRequest, *, every: str, replace: bool = False
) -> str:
    if every not in EVERY:
        raise SnapferryClientError(f"--every {every!r} is not one of {', '.join(EVERY)}")
    if req.kind == RepositoryJobKind.SYNC and not req.to:
        raise SnapferryClientError("a sync schedule needs --to DIR (the second repository)")
    schedule_id = repository_schedule_id(req.kind.value)
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            RepositoryJobWorkflow.run,
            req,
            id=f"repository-{req.kind.value}-run",
            task_queue=CONTROL_QUEUE,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=EVERY[every])]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    if replace:
        await delete_job_schedule(client, req.kind, missing_ok=True)
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError as err:
        raise SnapferryClientError(
            f"the {req.kind.value} schedule exists already (--replace to change it)"
        ) from err
    return schedule_id


async def delete_job_schedule(
    client: Client, kind: RepositoryJobKind, *, missing_ok: bool = False
) -> None:
    from temporalio.service import RPCError, RPCStatusCode

    try:
        await client.get_schedule_handle(repository_schedule_id(kind.value)).delete()
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        if not missing_ok:
            raise SnapferryClientError(f"there is no {kind.value} schedule") from None


async def list_job_schedules(client: Client) -> list[dict[str, Any]]:
    rows = []
    for kind in RepositoryJobKind:
        handle = client.get_schedule_handle(repository_schedule_id(kind.value))
        try:
            desc = await handle.describe()
        except Exception:  # noqa: BLE001 - not scheduled
            continue
        action = desc.schedule.action
        req: Any = None
        if isinstance(action, ScheduleActionStartWorkflow) and action.args:
            arg = action.args[0]
            if isinstance(arg, Payload):
                (req,) = await client.data_converter.decode([arg], [RepositoryJobRequest])
            else:
                req = RepositoryJobRequest.model_validate(arg)
        spec = desc.schedule.spec
        rows.append(
            {
                "schedule_id": handle.id,
                "job": req.model_dump(mode="json") if req is not None else None,
                "every_s": spec.intervals[0].every.total_seconds() if spec.intervals else None,
                "next_runs": [t.isoformat() for t in desc.info.next_action_times],
                "recent": [a.scheduled_at.isoformat() for a in desc.info.recent_actions],
            }
        )
    return rows


async def run_job_now(client: Client, req: RepositoryJobRequest) -> RepositoryJobResult:
    """One run of the job through the workers, now (what a tick of its schedule does)."""
    result: RepositoryJobResult = await client.execute_workflow(
        RepositoryJobWorkflow.run,
        req,
        id=f"repository-{req.kind.value}-{uuid.uuid4()}",
        task_queue=CONTROL_QUEUE,
    )
    return result
