"""Recurring policies on Temporal Schedules (real dev server, real VM): the calendar follows
the interval in the policy's timezone, and retention keeps exactly N snapshots."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from temporalio.client import (
    Client,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    ScheduleSpec,
    WorkflowExecutionStatus,
)

from snapferry.activities.contracts import (
    PolicyInterval,
    SnapshotPolicy,
    SnapshotState,
    VmRef,
    VolumeRef,
)
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.policies import create_policy, delete_policy, list_policies
from snapferry.workers.starter import SnapferryClientError
from snapferry.workflows.routing import host_queue, policy_schedule_id

from ..conftest import snapferry_cli

pytestmark = pytest.mark.integration

GONE = ("Destroying", "Destroyed", "Hidden")  # Hidden: deleted, its backup kept for a delta


def policy(vm: str, host: str, settings: Settings, **kw: object) -> SnapshotPolicy:
    return SnapshotPolicy.model_validate(
        {
            "policy_id": f"{vm}-vda-{kw.get('interval', 'hourly')}",
            "volume": VolumeRef(vm=VmRef(name=vm, host=host), disk="vda").model_dump(),
            "backup": settings.backup_defaults.model_dump(),
            **kw,
        }
    )


async def test_schedule_calendars_follow_interval_and_timezone(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str
) -> None:
    cases = {
        "hourly": (dict(interval="hourly", minute=15), timedelta(hours=1)),
        "daily": (
            dict(interval="daily", hour=2, minute=30, timezone="Europe/Berlin"),
            timedelta(days=1),
        ),
        "weekly": (dict(interval="weekly", hour=3, day_of_week=0), timedelta(weeks=1)),
    }
    for name, (kw, gap) in cases.items():
        p = policy(f"vm-{name}", host_name, settings, **kw)
        await create_policy(client, p, require_host=False)  # calendars only: no VM needed
        desc = await client.get_schedule_handle(policy_schedule_id(p.policy_id)).describe()
        times = desc.info.next_action_times[:3]
        assert len(times) == 3 and times[1] - times[0] in (
            gap,
            gap + timedelta(hours=1),
            gap - timedelta(hours=1),
        )
        local = [t.astimezone(ZoneInfo(p.timezone)) for t in times]
        assert all(t.minute == p.minute for t in local)
        if p.interval != PolicyInterval.HOURLY:
            assert all(t.hour == p.hour for t in local)
        if p.interval == PolicyInterval.WEEKLY:
            assert all(t.isoweekday() % 7 == p.day_of_week for t in local)
    ids = {r["policy"]["policy_id"] for r in await list_policies(client)}
    assert ids == {"vm-hourly-vda-hourly", "vm-daily-vda-daily", "vm-weekly-vda-weekly"}
    with pytest.raises(SnapferryClientError, match="already exists"):
        await create_policy(
            client,
            policy("vm-hourly", host_name, settings, interval="hourly", minute=15),
            require_host=False,
        )
    bad_tz = await snapferry_cli(
        "policy",
        "create",
        "--vm",
        "x",
        "--disk",
        "vda",
        "--interval",
        "daily",
        "--timezone",
        "Mars/Olympus",
        "--host",
        host_name,
    )
    assert bad_tz.returncode == 1 and "not a known timezone" in bad_tz.stderr
    # A policy's own snapshot.delta.max rides in its backup options to every snapshot.
    own_vm = make_vm(size=MIB, data_bytes=0, start=False)
    own = await snapferry_cli(
        *("policy", "create", "--vm", own_vm.name, "--disk", "vda", "--interval", "daily"),
        *("--delta-max", "4", "--host", host_name),
    )
    assert own.returncode == 0, own.stderr
    rows = {r["policy"]["policy_id"]: r["policy"] for r in await list_policies(client)}
    assert rows[f"{own_vm.name}-vda-daily"]["backup"]["delta_max"] == 4
    negative = await snapferry_cli(
        *("policy", "create", "--vm", "vm-neg", "--disk", "vda", "--interval", "daily"),
        *("--delta-max", "-1", "--host", host_name),
    )
    assert negative.returncode == 1 and "delta_max" in negative.stderr
    missing = await snapferry_cli("policy", "delete", "nope")
    assert missing.returncode == 1 and "no policy 'nope'" in missing.stderr


async def test_a_firing_schedule_holds_retention_at_n(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str
) -> None:
    """The schedule really fires (every 2 s instead of hourly): no trigger, no fake clock.

    The time-skipping test server implements neither Schedules nor visibility queries
    (CreateSchedule and ListWorkflowExecutions are "unimplemented" there), so this runs on
    the dev server in real time; the calendar per interval is checked separately above.
    """
    keep, runs_wanted = 2, 5
    vm = make_vm(size=16 * MIB, data_bytes=4 * MIB)
    p = policy(vm.name, host_name, settings, interval="hourly", keep=keep)
    await create_policy(
        client, p, spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(seconds=2))])
    )
    desc = await client.get_schedule_handle(policy_schedule_id(p.policy_id)).describe()
    assert desc.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
    most_live = 0
    for _ in range(600):
        runs = [wf async for wf in client.list_workflows('WorkflowType = "SnapshotPolicyRun"')]
        done = [r for r in runs if r.status == WorkflowExecutionStatus.COMPLETED]
        rows = await starter.list_snapshots(client, vm=vm.name)
        live = [r for r in rows if r["state"] not in GONE]
        if done:  # from the first completed run on, retention holds at N (+1 being taken)
            most_live = max(most_live, len(live))
        if len(done) >= runs_wanted:
            break
        await asyncio.sleep(0.2)
    await delete_policy(client, p.policy_id)
    assert len(done) >= runs_wanted, f"only {len(done)} runs in 120 s"
    for run in runs:  # let a run still in flight finish before the final count
        await client.get_workflow_handle(run.id, run_id=run.run_id).result()
    assert most_live <= keep + 1
    rows = await starter.list_snapshots(client, vm=vm.name)
    by_age = sorted(rows, key=lambda r: r["started"])
    live_ids = [r["id"] for r in by_age if r["state"] not in GONE]
    assert len(by_age) >= runs_wanted and live_ids == [r["id"] for r in by_age[-keep:]]
    # The deleted ones are gone, or Hidden exactly while a kept delta needs their backup.
    hidden = set()
    for r in by_age[:-keep]:
        state = (await starter.get_record(client, r["id"])).state
        assert state in (SnapshotState.DESTROYED, SnapshotState.HIDDEN)
        if state == SnapshotState.HIDDEN:
            hidden.add(r["id"])
    needed = set()
    for sid in live_ids:
        parent = (await starter.wait_settled(client, sid)).backup
        while parent is not None and parent.parent is not None:
            needed.add(parent.parent)
            parent = (await starter.get_record(client, parent.parent)).backup
    assert hidden == needed - set(live_ids)
    store = settings.secondary / "snapshots" / vm.name / "vda"
    on_secondary = sorted(f.name.split(".")[0] for f in store.glob("*.raw"))
    assert on_secondary == sorted(set(live_ids) | hidden)
    assert await list_policies(client) == []


async def test_a_policy_no_host_knows_is_refused_and_nothing_is_created(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str
) -> None:
    """The default --host is the machine the CLI runs on; a VM elsewhere, or a typo in
    --host, --vm or --disk, would otherwise only show up at the first tick, hours later."""
    refused = await snapferry_cli(
        *("policy", "create", "--vm", "web01", "--disk", "vda", "--interval", "daily"),
        *("--host", "no-such-host"),
    )
    assert refused.returncode == 1, refused.stdout
    assert "VM 'web01'" in refused.stderr and "host 'no-such-host'" in refused.stderr
    assert "not created" in refused.stderr
    assert [s.id async for s in await client.list_schedules()] == []
    assert [wf.id async for wf in client.list_workflows()] == []
    # A host whose worker runs, but no such VM on it, or no such disk: refused, naming it.
    vm = make_vm(size=MIB, data_bytes=0, start=False)
    for vm_name, disk, named in (("web01", "vda", "VM 'web01'"), (vm.name, "vdz", "'vdz'")):
        unknown = await snapferry_cli(
            *("policy", "create", "--vm", vm_name, "--disk", disk, "--interval", "daily"),
            *("--host", host_name),
        )
        assert unknown.returncode == 1, unknown.stdout
        assert "not created" in unknown.stderr and named in unknown.stderr, unknown.stderr
    assert [s.id async for s in await client.list_schedules()] == []
    # A VM its host knows is accepted.
    ok = await snapferry_cli(
        *("policy", "create", "--vm", vm.name, "--disk", "vda", "--interval", "daily"),
        *("--host", host_name),
    )
    assert ok.returncode == 0, ok.stderr
    assert [r["policy"]["policy_id"] for r in await list_policies(client)] == [
        f"{vm.name}-vda-daily"
    ]


async def test_after_vm_moved_a_policys_next_tick_targets_the_new_host(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str
) -> None:
    moving, staying = (make_vm(size=MIB, data_bytes=0, start=False).name for _ in range(2))
    for vm in (moving, staying):
        made = await snapferry_cli(
            *("policy", "create", "--vm", vm, "--disk", "vda", "--interval", "daily"),
            *("--host", host_name),
        )
        assert made.returncode == 0, made.stderr
    moved = await snapferry_cli("vm", "moved", "--vm", moving, "--host", "h-new")
    assert moved.returncode == 0, moved.stderr
    assert f"1 policy(ies) of {moving}" in moved.stdout and f"{moving}-vda-daily" in moved.stdout
    hosts = {
        r["policy"]["policy_id"]: r["policy"]["volume"]["vm"]["host"]
        for r in await list_policies(client)
    }
    assert hosts == {f"{moving}-vda-daily": "h-new", f"{staying}-vda-daily": host_name}

    ran = await snapferry_cli("policy", "run-now", f"{moving}-vda-daily")
    assert ran.returncode == 0, ran.stderr
    take_queue = None
    for _ in range(100):  # the tick starts the snapshot, whose take waits on h-new's queue
        async for wf in client.list_workflows('WorkflowType = "VolumeSnapshot"'):
            history = await client.get_workflow_handle(wf.id).fetch_history()
            for event in history.events:
                if event.HasField("activity_task_scheduled_event_attributes"):
                    take_queue = event.activity_task_scheduled_event_attributes.task_queue.name
        if take_queue:
            break
        await asyncio.sleep(0.2)
    assert take_queue == host_queue("h-new")
