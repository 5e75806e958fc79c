"""Recurring snapshot policies as Temporal Schedules: create, list, run now, delete.

Each policy is one schedule (``snapshot-policy-<id>``) whose action starts a
SnapshotPolicyRun. Its calendar follows the interval in the policy's timezone, and its
overlap policy is SKIP: a tick that finds the previous one still running is skipped
rather than queued, so a slow hypervisor never piles up snapshots.

The policy itself rides in the schedule's action (the tick's input), and that is what is
read back: ``vm moved`` rewrites it there, so the next tick targets the VM's new host.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleCalendarSpec,
    ScheduleDescription,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleRange,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowFailureError,
)
from temporalio.service import RPCError, RPCStatusCode

from snapferry.activities.contracts import PolicyInterval, SnapshotPolicy
from snapferry.workflows.entity import cause_message
from snapferry.workflows.policy import (
    CHECK_VOLUME_TIMEOUT,
    CheckVolumeWorkflow,
    SnapshotPolicyRunWorkflow,
)
from snapferry.workflows.routing import CONTROL_QUEUE, host_queue, policy_schedule_id

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


HOST_POLL_WAIT_S = 2.0  # a host worker that just started may not have polled yet


async def host_worker_polls(client: Client, host: str) -> bool:
    """Whether a host worker serves ``host`` (routed name): Temporal saw one poll its queue
    lately. Without one, a schedule's ticks would wait on that queue for ever."""
    request = DescribeTaskQueueRequest(
        namespace=client.namespace,
        task_queue=TaskQueue(name=host_queue(host)),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HOST_POLL_WAIT_S
    while True:
        response = await client.workflow_service.describe_task_queue(request)
        if response.pollers:
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.25)


async def check_volume_exists(client: Client, policy: SnapshotPolicy) -> None:
    """The policy's VM and disk exist on its host, as that host's worker sees them."""
    try:
        await client.execute_workflow(
            CheckVolumeWorkflow.run,
            policy.volume,
            id=f"check-volume-{uuid.uuid4()}",
            task_queue=CONTROL_QUEUE,
            execution_timeout=CHECK_VOLUME_TIMEOUT * 2,
        )
    except WorkflowFailureError as err:
        raise SnapferryClientError(
            f"policy {policy.policy_id!r} not created: {cause_message(err.cause)}"
        ) from err


async def create_policy(
    client: Client,
    policy: SnapshotPolicy,
    *,
    spec: ScheduleSpec | None = None,
    require_host: bool = True,
) -> str:
    """Create the policy's schedule. ``spec`` replaces the calendar the interval implies;
    tests use it to make a schedule fire every few seconds.

    Refused, before anything is created, when the policy exists already or when no host
    worker serves the VM's host (``require_host``): the operator hears it now, not from
    the first tick hours later."""
    schedule_id = policy_schedule_id(policy.policy_id)
    vm = policy.volume.vm
    routed = vm.model_copy(update={"host": routed_host(vm.host)})
    if require_host and not await host_worker_polls(client, routed.host):
        raise SnapferryClientError(
            f"policy {policy.policy_id!r} not created: no host worker serves host"
            f" {vm.host!r}, so no host knows VM {vm.name!r} ({vm.hypervisor.value}); pass the"
            f" --host VM {vm.name!r} runs on, or start its worker there"
            f" (snapferry worker --host {vm.host})"
        )
    policy = policy.model_copy(update={"volume": policy.volume.model_copy(update={"vm": routed})})
    if require_host:
        await check_volume_exists(client, policy)
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


async def policy_of(client: Client, desc: ScheduleDescription) -> SnapshotPolicy | None:
    """The policy as its next tick will get it: the schedule action's input."""
    action = desc.schedule.action
    if not isinstance(action, ScheduleActionStartWorkflow) or not action.args:
        return None
    arg = action.args[0]
    if not isinstance(arg, Payload):
        return SnapshotPolicy.model_validate(arg)
    (policy,) = await client.data_converter.decode([arg], [SnapshotPolicy])
    return policy  # type: ignore[no-any-return]


async def list_policies(client: Client) -> list[dict[str, Any]]:
    rows = []
    async for sched in await client.list_schedules():
        if not sched.id.startswith(policy_schedule_id("")):
            continue
        desc = await client.get_schedule_handle(sched.id).describe()
        policy = await policy_of(client, desc)
        info = sched.info
        rows.append(
            {
                "schedule_id": sched.id,
                "policy": policy.model_dump(mode="json") if policy else None,
                "next_runs": [t.isoformat() for t in (info.next_action_times if info else [])],
            }
        )
    return rows


async def move_policies(client: Client, *, vm: str, host: str) -> list[str]:
    """After a live migration: every policy of ``vm`` takes its later snapshots on ``host``
    (the schedule's action is rewritten; a tick already running keeps the host it got).
    Returns the policy IDs moved."""
    routed = routed_host(host)
    moved = []
    async for sched in await client.list_schedules():
        if not sched.id.startswith(policy_schedule_id("")):
            continue
        handle = client.get_schedule_handle(sched.id)
        policy = await policy_of(client, await handle.describe())
        if policy is None or policy.volume.vm.name != vm:
            continue
        there = policy.volume.vm.model_copy(update={"host": routed})
        policy = policy.model_copy(
            update={"volume": policy.volume.model_copy(update={"vm": there})}
        )

        def rewrite(update: ScheduleUpdateInput, policy: SnapshotPolicy = policy) -> ScheduleUpdate:
            schedule = update.description.schedule
            assert isinstance(schedule.action, ScheduleActionStartWorkflow)
            schedule.action.args = [policy]
            return ScheduleUpdate(schedule=schedule)

        await handle.update(rewrite)
        moved.append(policy.policy_id)
    return moved


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
