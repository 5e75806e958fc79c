"""``snapferry snapshot ...`` and ``snapferry backup ...``: volume snapshots and their backups."""

from __future__ import annotations

import argparse
from typing import Any

from snapferry.activities.contracts import (
    BootCheckOptions,
    RestoreResult,
    SnapshotRecord,
    SnapshotRequest,
    SnapshotState,
    new_snapshot_id,
)
from snapferry.activities.settings import Settings
from snapferry.workflows.snapshot import (
    CANCEL_BACKUP_UPDATE,
    CHECK_BOOT_UPDATE,
    CREATE_TEMPLATE_UPDATE,
    CREATE_VOLUME_UPDATE,
    DELETE_UPDATE,
    REVERT_UPDATE,
    VERIFY_BACKUP_UPDATE,
)

from .. import starter
from ..watch import watch
from .common import (
    Adder,
    add_check_boot_arg,
    add_quiesce_arg,
    add_volume_args,
    check_names,
    cli_client,
    given_or,
    operation_command,
    parse_duration,
    parse_input,
    print_record,
    print_rows,
    volume_from_args,
    web_ui_link,
)
from .export import FORMATS, cmd_snapshot_export
from .instant import register_instant
from .serve import register_serve


async def cmd_snapshot_create(args: argparse.Namespace, settings: Settings) -> int:
    req = parse_input(
        SnapshotRequest,
        {
            "snapshot_id": given_or(args.id, new_snapshot_id()),
            "volume": volume_from_args(args),
            "backup": settings.backup_defaults.model_dump() | {"full": args.full},
            "quiesce": args.quiesce,
            "check_boot": args.check_boot,
        },
    )
    client = await cli_client(settings)
    record = await starter.create_snapshot(client, req)
    print_record(record, args.json)
    return 0


async def cmd_snapshot_check(args: argparse.Namespace, settings: Settings) -> int:
    options = parse_input(
        BootCheckOptions,
        {"timeout_s": args.timeout, "console_line": args.console_line, "memory_mib": args.memory},
    )
    record: SnapshotRecord = await starter.snapshot_operation(
        await cli_client(settings), args.id, CHECK_BOOT_UPDATE, options
    )
    check = record.verified_boot
    assert check is not None
    if args.json:
        print(check.model_dump_json(indent=2))
    elif check.ok:
        print(f"snapshot {args.id}: its backup boots ({check.sign} after {check.seconds:.1f} s)")
    else:
        print(f"snapshot {args.id}: its backup did NOT boot: {check.detail}")
    return 0 if check.ok else 1


async def cmd_snapshot_show(args: argparse.Namespace, settings: Settings) -> int:
    record = await starter.get_record(await cli_client(settings), args.id)
    print_record(record, args.json)
    if not args.json:
        print(f"  web UI:  {web_ui_link(settings, starter.VOLUME.workflow_id(record.id))}")
    return 0


async def cmd_snapshot_list(args: argparse.Namespace, settings: Settings) -> int:
    check_names(vm=args.vm, disk=args.disk)
    if args.stuck is not None:
        if args.state or args.disk:
            raise starter.SnapferryClientError("--stuck goes with --vm only")
        stuck = await starter.stuck_snapshots(
            await cli_client(settings), older_than_s=args.stuck, vm=args.vm
        )
        rows = [
            {
                "id": r.id,
                "state": r.state.value,
                "vm": r.vm,
                "disk": r.disk,
                "for_s": round(age),
                "backup_error": r.backup_error,
            }
            for r, age in stuck
        ]
        print_rows(rows, args.json)
        return 0
    client = await cli_client(settings)
    rows = await starter.list_snapshots(client, vm=args.vm, disk=args.disk, state=args.state)
    if args.chain:
        for row in rows:
            row.update(backup_chain_columns(await starter.get_record(client, str(row["id"]))))
    print_rows(rows, args.json)
    return 0


def backup_chain_columns(record: SnapshotRecord) -> dict[str, Any]:
    """``snapshot list --chain``: each backup's kind, parent and stored bytes (one query per
    snapshot, so only on request)."""
    b = record.backup
    if b is None:
        return {"backup": None, "parent": None, "depth": None, "stored_bytes": None}
    return {"backup": b.kind, "parent": b.parent, "depth": b.depth, "stored_bytes": b.bytes_stored}


async def cmd_snapshot_wait(args: argparse.Namespace, settings: Settings) -> int:
    record = await starter.wait_for_state(
        await cli_client(settings), args.id, SnapshotState(args.state), timeout=args.timeout
    )
    print_record(record, args.json)
    return 0


async def cmd_snapshot_watch(args: argparse.Namespace, settings: Settings) -> int:
    record = await watch(await cli_client(settings), args.id)
    print_record(record, False)
    return 0 if record.state == SnapshotState.BACKED_UP else 1


async def cmd_backup_retry(args: argparse.Namespace, settings: Settings) -> int:
    if bool(args.id) == bool(args.all_failed):
        raise starter.SnapferryClientError("give either a snapshot ID or --all-failed")
    if not args.all_failed and (args.vm or args.policy):
        raise starter.SnapferryClientError("--vm and --policy go with --all-failed")
    check_names(vm=args.vm, policy=args.policy)
    client = await cli_client(settings)
    if args.id:
        record = await starter.retry_backup(client, args.id)
        print(f"backup of {record.id} restarted")
        return 0

    def report(record: SnapshotRecord, refused: str | None) -> None:
        what = f"refused: {refused}" if refused else "restarted"
        print(f"{record.id}  {record.vm}/{record.disk}  {what}  (was: {record.backup_error})")

    retried, refused = await starter.retry_all_failed(
        client, vm=args.vm, policy=args.policy, rate_per_s=args.rate, on_each=report
    )
    print(f"{len(retried)} backup(s) restarted, {len(refused)} refused")
    return 1 if refused else 0


def register_snapshots(sub: Any, add: Adder) -> None:
    snap = sub.add_parser("snapshot", help="volume snapshots").add_subparsers(
        dest="action", required=True
    )
    c = add(snap, "create", cmd_snapshot_create, "take a snapshot; returns once it is on primary")
    add_volume_args(c)
    c.add_argument("--id", help="snapshot ID (UUID); makes create idempotent")
    c.add_argument(
        "--full", action="store_true", help="back up in full, even where a delta is possible"
    )
    add_quiesce_arg(c)
    add_check_boot_arg(c)
    c.add_argument("--json", action="store_true")
    ck = add(
        snap,
        "check",
        cmd_snapshot_check,
        "health check: boot a throwaway VM from the backup (KVM host, read-only) and wait for"
        " a sign of life; exit 1 if none",
    )
    ck.add_argument("id")
    ck.add_argument(
        "--timeout", type=parse_duration, default=300.0, help="how long to wait (90s, 5m)"
    )
    ck.add_argument(
        "--console-line",
        metavar="REGEX",
        help="wait for a serial console line matching this instead of the guest agent",
    )
    ck.add_argument("--memory", type=int, default=512, metavar="MIB", help="the VM's memory")
    ck.add_argument("--json", action="store_true")
    s = add(snap, "show", cmd_snapshot_show, "print one snapshot's record")
    s.add_argument("id")
    s.add_argument("--json", action="store_true")
    ls = add(snap, "list", cmd_snapshot_list, "list snapshots")
    ls.add_argument("--vm")
    ls.add_argument("--disk", help="with --vm: one volume's snapshots")
    ls.add_argument("--state", choices=[s.value for s in SnapshotState])
    ls.add_argument(
        "--stuck",
        type=parse_duration,
        metavar="DURATION",
        help="only snapshots in Creating/CreatedOnPrimary/BackingUp for longer than this"
        " (90s, 30m, 1h, 2d), the longest first",
    )
    ls.add_argument(
        "--chain",
        action="store_true",
        help="show each backup's chain: full or delta, its parent and its stored bytes",
    )
    ls.add_argument("--json", action="store_true")
    wt = add(snap, "wait", cmd_snapshot_wait, "wait until a snapshot reaches a state")
    wt.add_argument("id")
    wt.add_argument(
        "--state", required=True, choices=[s.value for s in SnapshotState], help="the state"
    )
    wt.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    wt.add_argument("--json", action="store_true")
    wa = add(snap, "watch", cmd_snapshot_watch, "show the backup's progress bar")
    wa.add_argument("id")
    ex = add(snap, "export", cmd_snapshot_export, "write a backup out as a plain image file")
    ex.add_argument("id")
    ex.add_argument("--format", required=True, choices=FORMATS, help="the image's format")
    ex.add_argument("file", metavar="FILE", help="the new image (refused if it exists)")
    register_serve(snap, add)
    register_instant(snap, add)

    operations: list[tuple[str, str, str, bool, type]] = [
        ("delete", DELETE_UPDATE, "delete on secondary and primary", False, SnapshotRecord),
        ("revert", REVERT_UPDATE, "revert the stopped VM's disk to it", False, SnapshotRecord),
        ("to-volume", CREATE_VOLUME_UPDATE, "create a volume from it", True, RestoreResult),
        ("to-template", CREATE_TEMPLATE_UPDATE, "create a template from it", True, RestoreResult),
    ]
    for name, update, help_, takes_name, result_type in operations:
        command = operation_command(update, takes_name=takes_name, result_type=result_type)
        op = add(snap, name, command, help_)
        op.add_argument("id")
        if takes_name:
            op.add_argument("--name", required=True, help="the new volume's or template's name")
        op.add_argument("--json", action="store_true")


def register_backups(sub: Any, add: Adder) -> None:
    backup = sub.add_parser("backup", help="backups").add_subparsers(dest="action", required=True)
    r = add(backup, "retry", cmd_backup_retry, "start a failed backup again (or all of them)")
    r.add_argument("id", nargs="?", help="the snapshot whose backup failed")
    r.add_argument(
        "--all-failed",
        action="store_true",
        help="every snapshot whose backup failed and waits for a retry (from visibility)",
    )
    r.add_argument("--vm", help="with --all-failed: only this VM's snapshots")
    r.add_argument("--policy", help="with --all-failed: only this policy's snapshots")
    r.add_argument(
        "--rate",
        type=float,
        default=5.0,
        help="with --all-failed: retries per second, so the backup pool is not flooded",
    )
    cancel = add(
        backup,
        "cancel",
        operation_command(CANCEL_BACKUP_UPDATE),
        "cancel a running backup (its .partial files are removed)",
    )
    cancel.add_argument("id")
    verify = add(
        backup,
        "verify",
        operation_command(VERIFY_BACKUP_UPDATE, result_type=str),
        "re-read a backup and check it against its manifest checksum",
    )
    verify.add_argument("id")
