"""Recurring policies on Temporal Schedules (real dev server, real VM): the calendar follows
the interval in the policy's timezone, and retention keeps exactly N snapshots."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from temporalio.client import Client

from activities.contracts import PolicyInterval, SnapshotPolicy, SnapshotState, VmRef, VolumeRef
from activities.settings import Settings
from workers import starter
from workers.demo_vm import MIB
from workers.policies import create_policy, delete_policy, list_policies, run_policy_now
from workers.starter import SnapferryClientError
from workflows.routing import policy_schedule_id

from ..conftest import snapferry_cli

pytestmark = pytest.mark.integration


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
    client: Client, settings: Settings
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
        p = policy(f"vm-{name}", "h1", settings, **kw)
        await create_policy(client, p)
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
            client, policy("vm-hourly", "h1", settings, interval="hourly", minute=15)
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
    )
    assert bad_tz.returncode == 1 and "not a known timezone" in bad_tz.stderr
    missing = await snapferry_cli("policy", "delete", "nope")
    assert missing.returncode == 1 and "no policy 'nope'" in missing.stderr


async def test_retention_keeps_n_snapshots(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str
) -> None:
    vm = make_vm(size=16 * MIB, data_bytes=4 * MIB)
    p = policy(vm.name, host_name, settings, interval="hourly", keep=2)
    await create_policy(client, p)
    seen: list[str] = []
    for _ in range(4):  # each trigger is exactly what the schedule does when it fires
        await run_policy_now(client, p.policy_id)
        for _ in range(300):
            rows = await starter.list_snapshots(client, vm=vm.name)
            new = [r["id"] for r in rows if r["id"] not in seen]
            if new:
                break
            await asyncio.sleep(0.1)
        seen += new
        await starter.wait_settled(client, new[0])
    # Every run (snapshot + retention) has finished before we count.
    runs = [wf async for wf in client.list_workflows('WorkflowType = "SnapshotPolicyRun"')]
    assert len(runs) == 4
    for run in runs:
        await client.get_workflow_handle(run.id, run_id=run.run_id).result()
    rows = await starter.list_snapshots(client, vm=vm.name)
    live = sorted(r["id"] for r in rows if r["state"] != "Destroyed")
    assert len(seen) == 4
    assert live == sorted(seen[-2:])  # the newest two are kept
    for old in seen[:2]:
        assert (await starter.get_record(client, old)).state == SnapshotState.DESTROYED
    store = settings.secondary / "snapshots" / vm.name / "vda"
    assert sorted(f.name.split(".")[0] for f in store.glob("*.raw")) == sorted(seen[-2:])
    await delete_policy(client, p.policy_id)
    assert await list_policies(client) == []
