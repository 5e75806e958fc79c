"""``snapferry repository ...``: the backup repository on secondary and its jobs.

The repository is ``$SNAPFERRY_SECONDARY/repository`` unless ``--root`` names another; it is
encrypted when ``SNAPFERRY_REPOSITORY_KEY_FILE`` names a key made by ``repository key create``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from temporalio.client import WorkflowFailureError

from snapferry.activities.contracts import RepositoryJobKind, RepositoryJobRequest
from snapferry.activities.errors import SnapferryError
from snapferry.activities.settings import Settings
from snapferry.activities.storage.repository import Repository, create_key_file, jobs, key_from_env
from snapferry.workers.repository_schedules import (
    EVERY,
    delete_job_schedule,
    list_job_schedules,
    run_job_now,
    schedule_job,
)
from snapferry.workers.starter import SnapferryClientError
from snapferry.workflows.entity import cause_message

from .common import Adder, cli_client


def _root(args: argparse.Namespace, settings: Settings) -> Path:
    return Path(args.root) if args.root else settings.repository


def _open(args: argparse.Namespace, settings: Settings) -> Repository:
    root = _root(args, settings)
    if not (root / "config.json").exists():
        raise SnapferryError(f"{root} is not a snapferry repository (no config.json)")
    return Repository(root, key_from_env())


def _fail(err: SnapferryError) -> int:
    print(f"snapferry: error: {err}", file=sys.stderr)
    return 1


async def cmd_key_create(args: argparse.Namespace, settings: Settings) -> int:
    try:
        key = create_key_file(Path(args.file))
    except SnapferryError as err:
        return _fail(err)
    print(f"key {key.fingerprint} written to {args.file} (mode 0600)")
    print("keep a copy somewhere safe: without this key its backups cannot be read")
    return 0


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    try:
        s = jobs.status(_open(args, settings))
    except SnapferryError as err:
        return _fail(err)
    row = dataclasses.asdict(s) | {
        "dedup_ratio": round(s.dedup_ratio, 2),
        "compression_ratio": round(s.compression_ratio, 2),
    }
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        for name, value in row.items():
            print(f"{name}: {value}")
    return 0


async def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    try:
        result = jobs.verify(_open(args, settings))
    except SnapferryError as err:
        return _fail(err)
    print(f"verified {result.packs} packs, {result.blobs} blobs, {result.bytes_read} bytes read")
    for damage in result.damaged:
        print(f"damaged: {damage}")
    for snapshot, offsets in result.snapshots.items():
        print(f"snapshot {snapshot}: {len(offsets)} damaged chunks, first at offset {offsets[0]}")
    return 0 if result.ok else 1


async def cmd_gc(args: argparse.Namespace, settings: Settings) -> int:
    try:
        r = jobs.gc(_open(args, settings))
    except SnapferryError as err:
        return _fail(err)
    print(
        f"removed {r.packs_removed} packs ({r.bytes_freed} bytes); kept {r.packs_live} in use"
        f" and {r.packs_kept_young} too recent to judge"
    )
    return 0


async def cmd_sync(args: argparse.Namespace, settings: Settings) -> int:
    try:
        rate = args.rate_limit * 1e6 if args.rate_limit else None
        r = jobs.sync(_root(args, settings), Path(args.to), rate_limit_bps=rate)
    except SnapferryError as err:
        return _fail(err)
    print(f"copied {r.packs_copied} packs and {r.backups_copied} backups ({r.bytes_copied} bytes)")
    return 0


def _job(args: argparse.Namespace) -> RepositoryJobRequest:
    return RepositoryJobRequest(
        kind=RepositoryJobKind(args.job),
        root=args.root,
        to=str(Path(args.to).absolute()) if args.to else None,
        rate_limit_mbps=args.rate_limit,
    )


async def cmd_schedule(args: argparse.Namespace, settings: Settings) -> int:
    client = await cli_client(settings)
    try:
        sid = await schedule_job(client, _job(args), every=args.every, replace=args.replace)
    except (SnapferryClientError, ValueError) as err:
        print(f"snapferry: error: {err}", file=sys.stderr)
        return 1
    print(f"schedule {sid}: {args.job} {args.every}")
    return 0


async def cmd_unschedule(args: argparse.Namespace, settings: Settings) -> int:
    client = await cli_client(settings)
    try:
        await delete_job_schedule(client, RepositoryJobKind(args.job))
    except SnapferryClientError as err:
        print(f"snapferry: error: {err}", file=sys.stderr)
        return 1
    print(f"the {args.job} schedule is deleted")
    return 0


async def cmd_schedules(args: argparse.Namespace, settings: Settings) -> int:
    rows = await list_job_schedules(await cli_client(settings))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            nxt = row["next_runs"][0] if row["next_runs"] else "-"
            print(f"{row['schedule_id']}: every {row['every_s']:.0f} s, next {nxt}")
    return 0


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """The job on the backup workers now, as a tick of its schedule runs it."""
    client = await cli_client(settings)
    try:
        result = await run_job_now(client, _job(args))
    except WorkflowFailureError as err:
        print(f"snapferry: error: {cause_message(err.cause or err)}", file=sys.stderr)
        return 1
    print(json.dumps(result.model_dump(mode="json"), indent=2) if args.json else result.summary)
    return 0


def register(sub: argparse._SubParsersAction, add: Adder) -> None:  # type: ignore[type-arg]
    repo = sub.add_parser("repository", help="the backup repository on secondary and its jobs")
    rsub = repo.add_subparsers(dest="repository_command", required=True)
    key = rsub.add_parser("key", help="repository keys")
    ksub = key.add_subparsers(dest="key_command", required=True)
    create = add(ksub, "create", cmd_key_create, "write a new random repository key to FILE")
    create.add_argument(
        "file", metavar="FILE", help="where to write the key (refused if it exists)"
    )

    def with_root(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--root", help="the repository (default: $SNAPFERRY_SECONDARY/repository)")
        return sp

    status = with_root(add(rsub, "status", cmd_status, "bytes, chunks, dedup and compression"))
    status.add_argument("--json", action="store_true")
    with_root(add(rsub, "verify", cmd_verify, "re-read every chunk from the medium and check it"))
    with_root(add(rsub, "gc", cmd_gc, "free the chunks no backup uses (safe while backups run)"))
    sync = with_root(add(rsub, "sync", cmd_sync, "copy what a second repository lacks"))
    sync.add_argument("--to", required=True, help="the second repository's directory")
    sync.add_argument("--rate-limit", type=float, metavar="MBPS", help="at most MB/s copied")

    def job_args(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("job", choices=[k.value for k in RepositoryJobKind], help="which job")
        sp.add_argument("--to", help="sync: the second repository's directory")
        sp.add_argument("--rate-limit", type=float, metavar="MBPS", help="sync: at most MB/s")
        return with_root(sp)

    sched = job_args(
        add(rsub, "schedule", cmd_schedule, "run a job on the backup workers on a schedule")
    )
    sched.add_argument("--every", required=True, choices=list(EVERY), help="how often")
    sched.add_argument("--replace", action="store_true", help="replace the job's schedule")
    unsched = add(rsub, "unschedule", cmd_unschedule, "delete a job's schedule")
    unsched.add_argument("job", choices=[k.value for k in RepositoryJobKind], help="whose schedule")
    listed = add(rsub, "schedules", cmd_schedules, "the jobs' schedules and their next runs")
    listed.add_argument("--json", action="store_true", help="print JSON")
    run = job_args(add(rsub, "run", cmd_run, "run a job on the backup workers now, and wait"))
    run.add_argument("--json", action="store_true", help="print the result as JSON")
