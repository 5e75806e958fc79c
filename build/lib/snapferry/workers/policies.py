"""Recurring snapshot policies as Temporal Schedules: create, list, run now, delete.

Each policy is one schedule (``snapshot-policy-<id>``) whose action starts a
SnapshotPolicyRun. Its calendar follows the interval in the policy's timezone, and its
overlap policy is SKIP: a tick that finds the previous one still running is skipped
rather than queued, so a slow hypervisor never piles up snapshots.
"""

from __future__ import annotations

from typing import Any

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleCalendarSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
    ScheduleSpec,
)
from temporalio.service import RPCError, RPCStatusCode

from snapferry.activities.contracts import PolicyInterval, SnapshotPolicy
from snapferry.workflows.policy import SnapshotPolicyRunWorkflow
from snapferry.workflows.routing import CONTROL_QUEUE, policy_schedule_id

from .routing import routed_host
from .starter import SnapferryClientError

_ALL_HOURS = (ScheduleRange(0, 23),)


def calendar_for(policy: SnapshotPolicy) -> ScheduleCalendarSpec:
    minute = (ScheduleRange(policy.minute),)
    hour = (ScheduleRange(policy.hour),)
    match policy.interval:
        case PolicyInterval.HOURLY:
            return ScheduleCalendarSpec(minute=minute, hour=_ALL_HOURS)
        case PolicyInterval.DAILY:
            return ScheduleCalendarSpec(minute=minute, hour=hour)
        case PolicyInterval.WEEKLY:
            return ScheduleCalendarSpec(
                minute=minute, hour=hour, day_of_week=(ScheduleRange(policy.day_of_week),)
            )
        case PolicyInterval.MONTHLY:
            return ScheduleCalendarSpec(
                minute=minute, hour=hour, day_of_month=(ScheduleRange(policy.day_of_month),)
            )
    raise ValueError(policy.interval)


def schedule_for(policy: SnapshotPolicy) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            SnapshotPolicyRunWorkflow.run,
            policy,
            id=f"policy-run-{policy.policy_id}",
            task_queue=CONTROL_QUEUE,
        ),
        spec=ScheduleSpec(calendars=[calendar_for(policy)], time_zone_name=policy.timezone),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


async def create_policy(
    client: Client, policy: SnapshotPolicy, *, spec: ScheduleSpec | None = None
) -> str:
    """Create the policy's schedule. ``spec`` replaces the calendar the interval implies;
    tests use it to make a schedule fire every few seconds."""
    schedule_id = policy_schedule_id(policy.policy_id)
    vm = policy.volume.vm
    routed = vm.model_copy(update={"host": routed_host(vm.host)})
    policy = policy.model_copy(update={"volume": policy.volume.model_copy(update={"vm": routed})})
    schedule = schedule_for(policy)
    if spec is not None:
        schedule.spec = spec
    try:
        await client.create_schedule(
            schedule_id,
            schedule,
            memo={
                "policy": policy.model_dump(mode="json"),
            },
        )
    except ScheduleAlreadyRunningError as err:
        raise SnapferryClientError(f"policy {policy.policy_id!r} already exists") from err
    return schedule_id


async def list_policies(client: Client) -> list[dict[str, Any]]:
    rows = []
    async for sched in await client.list_schedules():
        if not sched.id.startswith(policy_schedule_id("")):
            continue
        memo = await sched.memo_value("policy", default=None)
        info = sched.info
        rows.append(
            {
                "schedule_id": sched.id,
                "policy": memo,
                "next_runs": [t.isoformat() for t in (info.next_action_times if info else [])],
            }
        )
    return rows


async def _handle(client: Client, policy_id: str):  # type: ignore[no-untyped-def]
    handle = client.get_schedule_handle(policy_schedule_id(policy_id))
    try:
        await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise SnapferryClientError(f"no policy {policy_id!r}") from err
        raise
    return handle


async def run_policy_now(client: Client, policy_id: str) -> None:
    """Trigger one tick now (the operator's "snapshot now" for a policy)."""
    await (await _handle(client, policy_id)).trigger(overlap=ScheduleOverlapPolicy.ALLOW_ALL)


async def delete_policy(client: Client, policy_id: str) -> None:
    """Stop the schedule; the snapshots it took stay (delete them like any other)."""
    await (await _handle(client, policy_id)).delete()
