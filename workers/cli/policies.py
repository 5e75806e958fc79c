"""``snapferry policy ...``: recurring snapshot policies (Temporal Schedules)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from snapferry.activities.contracts import (
    PolicyInterval,
    SnapshotPolicy,
)
from snapferry.activities.settings import Settings

from .common import (
    Adder,
    add_check_boot_arg,
    add_quiesce_arg,
    add_volume_args,
    check_names,
    cli_client,
    given_or,
    parse_input,
    volume_from_args,
)


async def cmd_policy_create(args: argparse.Namespace, settings: Settings) -> int:
    from ..policies import create_policy

    policy = parse_input(
        SnapshotPolicy,
        {
            "policy_id": given_or(args.id, f"{args.vm}-{args.disk}-{args.interval}"),
            "volume": volume_from_args(args),
            "interval": args.interval,
            "timezone": args.timezone,
            "keep": args.keep,
            "minute": args.minute,
            "hour": args.hour,
            "day_of_week": args.day_of_week,
            "day_of_month": args.day_of_month,
            "backup": settings.backup_defaults.model_dump()
            | {"delta_max": args.delta_max, "rate_limit_mbps": args.rate_limit},
            "quiesce": args.quiesce,
            "check_boot": args.check_boot,
        },
    )
    schedule_id = await create_policy(await cli_client(settings), policy)
    print(f"policy {policy.policy_id} created (schedule {schedule_id})")
    return 0


async def cmd_policy_list(args: argparse.Namespace, settings: Settings) -> int:
    from ..policies import list_policies

    rows = await list_policies(await cli_client(settings))
    if args.json:
        print(json.dumps(rows, indent=2))
    for r in [] if args.json else rows:
        p = r["policy"] or {}
        print(
            f"{p.get('policy_id')}  {p.get('interval')} keep={p.get('keep')}"
            f" tz={p.get('timezone')}  next {', '.join(r['next_runs'][:1])}"
        )
    return 0


async def cmd_policy_delete(args: argparse.Namespace, settings: Settings) -> int:
    from ..policies import delete_policy

    check_names(policy=args.id)
    await delete_policy(await cli_client(settings), args.id)
    print(f"policy {args.id} deleted; its snapshots are kept")
    return 0


async def cmd_policy_run(args: argparse.Namespace, settings: Settings) -> int:
    from ..policies import run_policy_now

    check_names(policy=args.id)
    await run_policy_now(await cli_client(settings), args.id)
    print(f"policy {args.id} triggered")
    return 0


def register(sub: Any, add: Adder) -> None:
    pol = sub.add_parser("policy", help="recurring snapshot policies").add_subparsers(
        dest="action", required=True
    )
    pc = add(pol, "create", cmd_policy_create, "create a recurring policy (a Temporal Schedule)")
    add_volume_args(pc)
    pc.add_argument(
        "--interval",
        required=True,
        choices=[i.value for i in PolicyInterval],
        help="how often (CloudStack's intervals)",
    )
    pc.add_argument("--keep", type=int, default=8, help="snapshots kept (CloudStack: 8)")
    pc.add_argument("--timezone", default="UTC", help="the schedule's timezone (IANA name)")
    pc.add_argument("--minute", type=int, default=0, help="minute of the hour it runs at")
    pc.add_argument("--hour", type=int, default=0, help="daily/weekly/monthly: hour it runs")
    pc.add_argument("--day-of-week", type=int, default=0, help="weekly; 0 = Sunday")
    pc.add_argument("--day-of-month", type=int, default=1, help="monthly; 1-28")
    pc.add_argument(
        "--delta-max",
        type=int,
        help="this policy's snapshot.delta.max: deltas before a new full (0 = always full;"
        " default: the worker's SNAPFERRY_SNAPSHOT_DELTA_MAX)",
    )
    pc.add_argument(
        "--rate-limit",
        type=float,
        metavar="MBPS",
        help="at most MB/s read from primary by this policy's backups (the lower of it and"
        " the worker's SNAPFERRY_BACKUP_RATE_LIMIT_MBPS)",
    )
    pc.add_argument("--id", help="policy ID (default VM-DISK-INTERVAL)")
    add_quiesce_arg(pc)
    add_check_boot_arg(pc)
    pl = add(pol, "list", cmd_policy_list, "list policies and their next run")
    pl.add_argument("--json", action="store_true")
    pd = add(pol, "delete", cmd_policy_delete, "delete a policy (its snapshots stay)")
    pd.add_argument("id", help="the policy's ID, as printed by create and list")
    pr = add(pol, "run-now", cmd_policy_run, "trigger one run of a policy now")
    pr.add_argument("id", help="the policy's ID, as printed by create and list")
