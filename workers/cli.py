"""``snapferry``: the command line for operators, the demo, and the worker processes.

Every command that prints a record takes ``--json``. Errors exit non-zero with a message
that names what was wrong (exit codes: 0 done, 1 refused or failed, 2 usage, 130 Ctrl-C).
The process ends with ``os._exit`` after flushing, because a Temporal client can abort the
interpreter at shutdown (temporalio/sdk-python#300) and turn success into exit code 134.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from snapferry.activities.contracts import (
    HypervisorType,
    PolicyInterval,
    RestoreResult,
    SnapshotPolicy,
    SnapshotRecord,
    SnapshotRequest,
    SnapshotState,
    VmSnapshotRecord,
    VmSnapshotRequest,
    VmSnapshotState,
    VmSnapshotType,
    new_snapshot_id,
)
from snapferry.activities.settings import Settings
from snapferry.workflows.backup import text_bar  # noqa: E402
from snapferry.workflows.snapshot import (  # noqa: E402  (names of the snapshot operations)
    CANCEL_BACKUP_UPDATE,
    CREATE_TEMPLATE_UPDATE,
    CREATE_VOLUME_UPDATE,
    DELETE_UPDATE,
    REVERT_UPDATE,
    VERIFY_BACKUP_UPDATE,
)
from snapferry.workflows.vm_snapshot import DELETE_VM_SNAPSHOT_UPDATE, REVERT_VM_SNAPSHOT_UPDATE

from . import starter
from .client import connect
from .stack import Stack

CLI_CONNECT_WAIT_S = 3.0  # an operator's command should fail fast when Temporal is down


async def cli_client(settings: Settings) -> Any:
    return await connect(settings, wait_s=CLI_CONNECT_WAIT_S)


def default_host() -> str:
    return os.environ.get("SNAPFERRY_HOST") or socket.gethostname().split(".")[0]


def print_record(record: SnapshotRecord, as_json: bool) -> None:
    if as_json:
        print(record.model_dump_json(indent=2))
        return
    print(f"snapshot {record.id}  {record.state.value}  vm={record.vm} disk={record.disk}")
    if record.primary and record.primary_released:
        print("  primary: released (merged back after the verified backup)")
    elif record.primary:
        print(f"  primary: {record.primary.image} (overlay {record.primary.overlay})")
    if record.backup:
        print(f"  backup:  {record.backup.path}\n  checksum {record.backup.checksum}")
    if record.backup_error:
        print(f"  backup failed: {record.backup_error}")
    if record.error:
        print(f"  error: {record.error}")


def print_vm_record(record: VmSnapshotRecord, as_json: bool) -> None:
    if as_json:
        print(record.model_dump_json(indent=2))
        return
    name = f" ({record.name})" if record.name else ""
    print(
        f"VM snapshot {record.id}{name}  {record.state.value}  {record.type.value} vm={record.vm}"
    )
    if record.taken:
        for disk, overlay in record.taken.overlays.items():
            print(f"  {disk}: frozen below {overlay}")
        if record.taken.memory:
            print(f"  memory: {record.taken.memory}")
    if record.error:
        print(f"  error: {record.error}")


def print_result(result: Any, as_json: bool, *, snapshot_id: str) -> None:
    """Print whatever an operation returned: a record of either kind, a checksum, a path."""
    if isinstance(result, SnapshotRecord):
        print_record(result, as_json)
    elif isinstance(result, VmSnapshotRecord):
        print_vm_record(result, as_json)
    elif isinstance(result, str):
        print(f"backup of {snapshot_id} verified: {result}")
    else:
        print(result.model_dump_json(indent=2) if as_json else f"created {result.path}")


def print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        where = f"{r['vm']}/{r['disk']}" if "disk" in r else r["vm"]
        when = r["started"] if "started" in r else f"for {r['for_s']} s"
        print(f"{r['id']}  {r['state']:<16} {where}  {when}")
        if r.get("backup_error"):
            print(f"    last backup error: {r['backup_error']}")


async def watch(client: Any, snapshot_id: str, *, out: Any = sys.stdout) -> SnapshotRecord:
    """Draw the backup's progress until the snapshot is BackedUp or its backup failed."""
    while True:
        record = await starter.get_record(client, snapshot_id)
        if record.state in (SnapshotState.BACKED_UP, SnapshotState.ERROR) or record.backup_error:
            if record.state == SnapshotState.BACKED_UP:
                size = record.backup.virtual_size if record.backup else 0
                out.write(f"\r{text_bar(size, size, 40)} BackedUp" + " " * 20 + "\n")
            return record
        progress = await starter.backup_progress(client, record)
        if progress:
            out.write(
                f"\r{text_bar(progress.bytes_done, progress.bytes_total, 40)}"
                f" {progress.bytes_done // 2**20}/{progress.bytes_total // 2**20} MiB"
                f" {progress.bytes_per_second / 1e6:6.0f} MB/s  {record.state.value}"
            )
        else:
            out.write(f"\r{text_bar(0, 1, 40)} {record.state.value}")
        out.flush()
        await asyncio.sleep(0.2)


# -- commands --------------------------------------------------------------------------------
async def cmd_snapshot_create(args: argparse.Namespace, settings: Settings) -> int:
    try:
        req = SnapshotRequest.model_validate(
            {
                "snapshot_id": args.id or new_snapshot_id(),
                "volume": volume_from_args(args),
                "backup": settings.backup_defaults.model_dump(),
            }
        )
    except ValidationError as err:
        raise starter.SnapferryClientError(_validation_message(err)) from err
    client = await cli_client(settings)
    record = await starter.create_snapshot(client, req)
    print_record(record, args.json)
    return 0


def web_ui_link(settings: Settings, workflow_id: str) -> str:
    """The snapshot's workflow in the Web UI (``SNAPFERRY_UI_URL`` for a cluster's UI)."""
    base = os.environ.get("SNAPFERRY_UI_URL") or f"http://127.0.0.1:{settings.ui_port}"
    return f"{base.rstrip('/')}/namespaces/{settings.namespace}/workflows/{workflow_id}"


async def cmd_snapshot_show(args: argparse.Namespace, settings: Settings) -> int:
    record = await starter.get_record(await cli_client(settings), args.id)
    print_record(record, args.json)
    if not args.json:
        print(f"  web UI:  {web_ui_link(settings, starter.VOLUME.workflow_id(record.id))}")
    return 0


async def cmd_snapshot_list(args: argparse.Namespace, settings: Settings) -> int:
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
    rows = await starter.list_snapshots(
        await cli_client(settings), vm=args.vm, disk=args.disk, state=args.state
    )
    print_rows(rows, args.json)
    return 0


async def cmd_vm_moved(args: argparse.Namespace, settings: Settings) -> int:
    moved = await starter.move_vm(await cli_client(settings), vm=args.vm, host=args.host)
    print(f"{len(moved)} live snapshot(s) of {args.vm} now follow it on host {args.host}")
    for wf_id in moved:
        print(f"  {wf_id}")
    return 0


async def cmd_vm_snapshot_create(args: argparse.Namespace, settings: Settings) -> int:
    try:
        req = VmSnapshotRequest.model_validate(
            {
                "snapshot_id": args.id or new_snapshot_id(),
                "vm": {"name": args.vm, "host": args.host, "hypervisor": args.hypervisor},
                "type": args.type,
                "name": args.name,
            }
        )
    except ValidationError as err:
        raise starter.SnapferryClientError(_validation_message(err)) from err
    record = await starter.create_vm_snapshot(await cli_client(settings), req)
    print_vm_record(record, args.json)
    return 0


async def cmd_vm_snapshot_show(args: argparse.Namespace, settings: Settings) -> int:
    record = await starter.get_record(await cli_client(settings), args.id, starter.VM)
    print_vm_record(record, args.json)
    if not args.json:
        print(f"  web UI:  {web_ui_link(settings, starter.VM.workflow_id(record.id))}")
    return 0


async def cmd_vm_snapshot_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = await starter.list_snapshots(
        await cli_client(settings), vm=args.vm, state=args.state, kind=starter.VM
    )
    print_rows(rows, args.json)
    return 0


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


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``2d`` (or plain seconds) in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (e.g. 90s, 30m, 1h, 2d)"
        ) from None


def _operation_command(
    update: str,
    *,
    takes_name: bool = False,
    result_type: type = SnapshotRecord,
    kind: starter.Kind = starter.VOLUME,
):  # type: ignore[no-untyped-def]
    """A CLI command that sends one update to a snapshot and prints what it returns."""

    async def command(args: argparse.Namespace, settings: Settings) -> int:
        extra = [args.name] if takes_name else []
        result = await starter.snapshot_operation(
            await cli_client(settings), args.id, update, *extra, result_type=result_type, kind=kind
        )
        print_result(result, getattr(args, "json", False), snapshot_id=args.id)
        return 0

    return command


async def cmd_policy_create(args: argparse.Namespace, settings: Settings) -> int:
    from .policies import create_policy

    try:
        policy = SnapshotPolicy.model_validate(
            {
                "policy_id": args.id or f"{args.vm}-{args.disk}-{args.interval}",
                "volume": volume_from_args(args),
                "interval": args.interval,
                "timezone": args.timezone,
                "keep": args.keep,
                "minute": args.minute,
                "hour": args.hour,
                "day_of_week": args.day_of_week,
                "day_of_month": args.day_of_month,
                "backup": settings.backup_defaults.model_dump(),
            }
        )
    except ValidationError as err:
        raise starter.SnapferryClientError(_validation_message(err)) from err
    schedule_id = await create_policy(await cli_client(settings), policy)
    print(f"policy {policy.policy_id} created (schedule {schedule_id})")
    return 0


async def cmd_policy_list(args: argparse.Namespace, settings: Settings) -> int:
    from .policies import list_policies

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
    from .policies import delete_policy

    await delete_policy(await cli_client(settings), args.id)
    print(f"policy {args.id} deleted; its snapshots are kept")
    return 0


async def cmd_policy_run(args: argparse.Namespace, settings: Settings) -> int:
    from .policies import run_policy_now

    await run_policy_now(await cli_client(settings), args.id)
    print(f"policy {args.id} triggered")
    return 0


async def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from .replay import replay_closed

    count, failures = await replay_closed(
        await cli_client(settings),
        limit=args.limit,
        export=Path(args.export) if args.export else None,
    )
    for failure in failures:
        print(f"NON-DETERMINISM: {failure}")
    print(f"replayed {count} closed workflows against this code: {len(failures)} failed")
    return 1 if failures else 0


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from .worker import running_workers

    if not args.host and not args.backup:
        raise starter.SnapferryClientError("say what to serve: --host NAME and/or --backup")
    address = args.metrics_address or os.environ.get("SNAPFERRY_METRICS_ADDRESS")
    runtime = None
    if address:
        from .metrics import metrics_runtime

        try:
            runtime = metrics_runtime(address)
        except ValueError as err:
            raise starter.SnapferryClientError(str(err)) from None
    client = await connect(settings, runtime=runtime)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_workers(
        client, settings, hosts=args.host, backup=args.backup, concurrency=args.concurrency
    ):
        print(
            f"worker ready: hosts={args.host or []} backup={args.backup}"
            f" concurrency={args.concurrency}"
            + (f" metrics=http://{address}/metrics" if address else ""),
            flush=True,
        )
        await stop.wait()
    return 0


async def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    stack = Stack(settings)
    worker_args = ["--host", args.host, "--backup", "--concurrency", str(args.concurrency)]
    stack.up(workers=not args.no_workers, worker_args=worker_args)
    status = stack.status()
    print(f"temporal: {settings.temporal_address} (pid {status['temporal'] or 'external'})")
    print(f"web ui:   http://127.0.0.1:{settings.ui_port}")
    if not args.no_workers:
        print(f"worker:   pid {status['worker']} (host {args.host}, backup pool)")
    print(f"logs:     {settings.home / 'logs'}")
    return 0


async def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    stopped = Stack(settings).down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


async def cmd_codec_server(args: argparse.Namespace, settings: Settings) -> int:
    from .codec import CodecAuth, CodecAuthError, KeyRing, codec_server

    ring = KeyRing.from_env()
    if ring is None:
        raise starter.SnapferryClientError("set SNAPFERRY_CODEC_KEYS_FILE to the codec keys file")
    try:
        auth = CodecAuth.from_env(
            tls_cert=args.tls_cert_file,
            tls_key=args.tls_key_file,
            client_ca=args.tls_client_ca_file,
            insecure_no_auth=args.insecure_no_auth,
        )
        server = codec_server(
            ring, host=args.host, port=args.port, ui_origin=args.ui_origin, auth=auth
        )
    except CodecAuthError as err:
        raise starter.SnapferryClientError(f"codec server not started: {err}") from err
    print(
        f"codec server on {auth.scheme}://{args.host}:{server.server_port} for {args.ui_origin}"
        f" (keys {sorted(ring.keys)}, current {ring.current});"
        f" auth: {auth.describe(args.host, server.server_port)}",
        flush=True,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serving = loop.run_in_executor(None, server.serve_forever)
    await stop.wait()
    server.shutdown()
    await serving
    return 0


async def cmd_codec_key(args: argparse.Namespace, settings: Settings) -> int:
    from .codec import new_key

    print(new_key())
    return 0


async def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from .schema import write_schemas

    for path in write_schemas(Path(args.out)):
        print(path)
    return 0


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    return await run_demo(settings, host=args.host, size_mib=args.size_mib)


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    return "invalid input: " + "; ".join(parts)


def add_volume_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", required=True)
    parser.add_argument("--disk", required=True)
    parser.add_argument("--host", default=default_host())
    parser.add_argument("--hypervisor", default="kvm", choices=[h.value for h in HypervisorType])


# Help for the options that recur across commands; the others carry their own.
COMMON_HELP = {
    "id": "the snapshot's ID (a UUID, as printed by create and list)",
    "json": "print the result as JSON (the payload's schema; see 'snapferry schema')",
    "vm": "the VM: libvirt domain, vSphere VM or XenServer VM (name or UUID)",
    "disk": "the volume: the disk's target as the VM sees it (e.g. vda; VMware: disk name)",
    "host": "the hypervisor host whose worker runs the operation (KVM: the host the VM is"
    " on; VMware/XenServer: the worker that talks to vCenter / the pool master)",
    "hypervisor": "which driver the host worker uses",
    "state": "only snapshots in this state (CloudStack's state names)",
}

EPILOG = (
    "exit codes: 0 done; 1 refused or failed (the reason is printed); 2 bad usage;"
    " 130 interrupted. Configuration comes from SNAPFERRY_* environment variables (README)."
)


class _DefaultsShown(argparse.HelpFormatter):
    """Shows an option's default where it has one worth showing (not None, not False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
            text += " (default: %(default)s)"
        return text


def explain(parser: argparse.ArgumentParser) -> None:
    """Give every option a help text and show its default, recursively: an operator's
    ``--help`` must say what each option means and what happens if it is left out."""
    parser.formatter_class = _DefaultsShown
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                explain(child)
        elif action.help is None:
            action.help = COMMON_HELP.get(action.dest)


def volume_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The volume as a plain dict, validated with the rest of its request."""
    return {
        "vm": {"name": args.vm, "host": args.host, "hypervisor": args.hypervisor},
        "disk": args.disk,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapferry", description=__doc__.split("\n")[0], epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)

    def add(parent: Any, name: str, fn: Callable[..., Awaitable[int]], help_: str) -> Any:
        sp = parent.add_parser(name, help=help_, description=help_, epilog=EPILOG)
        sp.set_defaults(fn=fn)
        return sp

    up = add(sub, "up", cmd_up, "start the embedded stack (dev server + worker) in the background")
    up.add_argument(
        "--no-workers", action="store_true", help="start only the dev server, no worker"
    )
    up.add_argument("--host", default=default_host(), help="the host queue its worker serves")
    up.add_argument("--concurrency", type=int, default=2, help="parallel backups of its worker")
    add(sub, "down", cmd_down, "stop the embedded stack started by 'up'")

    w = add(sub, "worker", cmd_worker, "run workers in the foreground")
    w.add_argument("--host", action="append", help="serve this hypervisor host's queue")
    w.add_argument("--backup", action="store_true", help="serve the backup pool")
    w.add_argument("--concurrency", type=int, default=2, help="parallel backups")
    w.add_argument(
        "--metrics-address",
        help="serve Prometheus metrics (Temporal SDK + snapferry) at this PORT or IP:PORT;"
        " a bare port binds 127.0.0.1 (default: SNAPFERRY_METRICS_ADDRESS, else off)",
    )

    snap = sub.add_parser("snapshot", help="volume snapshots").add_subparsers(
        dest="action", required=True
    )
    c = add(snap, "create", cmd_snapshot_create, "take a snapshot; returns once it is on primary")
    add_volume_args(c)
    c.add_argument("--id", help="snapshot ID (UUID); makes create idempotent")
    c.add_argument("--json", action="store_true")
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

    operations: list[tuple[str, str, str, bool, type]] = [
        ("delete", DELETE_UPDATE, "delete on secondary and primary", False, SnapshotRecord),
        ("revert", REVERT_UPDATE, "revert the stopped VM's disk to it", False, SnapshotRecord),
        ("to-volume", CREATE_VOLUME_UPDATE, "create a volume from it", True, RestoreResult),
        ("to-template", CREATE_TEMPLATE_UPDATE, "create a template from it", True, RestoreResult),
    ]
    for name, update, help_, takes_name, result_type in operations:
        command = _operation_command(update, takes_name=takes_name, result_type=result_type)
        op = add(snap, name, command, help_)
        op.add_argument("id")
        if takes_name:
            op.add_argument("--name", required=True, help="the new volume's or template's name")
        op.add_argument("--json", action="store_true")

    vms = sub.add_parser("vm-snapshot", help="VM snapshots (every disk, maybe memory)")
    vsub = vms.add_subparsers(dest="action", required=True)
    vc = add(vsub, "create", cmd_vm_snapshot_create, "take a VM snapshot; returns when Ready")
    vc.add_argument("--vm", required=True)
    vc.add_argument("--host", default=default_host())
    vc.add_argument("--hypervisor", default="kvm", choices=[h.value for h in HypervisorType])
    vc.add_argument(
        "--type",
        default="Disk",
        choices=[t.value for t in VmSnapshotType],
        help="Disk: every disk at one instant; DiskAndMemory: plus the RAM (running VM)",
    )
    vc.add_argument("--name", help="display name")
    vc.add_argument("--id", help="VM snapshot ID (UUID); makes create idempotent")
    vc.add_argument("--json", action="store_true")
    vs = add(vsub, "show", cmd_vm_snapshot_show, "print one VM snapshot's record")
    vs.add_argument("id")
    vs.add_argument("--json", action="store_true")
    vl = add(vsub, "list", cmd_vm_snapshot_list, "list VM snapshots")
    vl.add_argument("--vm")
    vl.add_argument(
        "--state", choices=[s.value for s in VmSnapshotState], help="only VM snapshots in it"
    )
    vl.add_argument("--json", action="store_true")
    vm_operations = [
        ("revert", REVERT_VM_SNAPSHOT_UPDATE, "revert the VM to it (Disk: VM stopped first)"),
        ("delete", DELETE_VM_SNAPSHOT_UPDATE, "delete it; other snapshots are untouched"),
    ]
    for name, update, help_ in vm_operations:
        command = _operation_command(update, result_type=VmSnapshotRecord, kind=starter.VM)
        op = add(vsub, name, command, help_)
        op.add_argument("id")
        op.add_argument("--json", action="store_true")

    vmc = sub.add_parser("vm", help="the VM itself").add_subparsers(dest="action", required=True)
    mv = add(
        vmc,
        "moved",
        cmd_vm_moved,
        "after a live migration: send the VM's live snapshots' host operations to its new host",
    )
    mv.add_argument("--vm", required=True, help="the VM that moved")
    mv.add_argument("--host", required=True, help="the host it runs on now")

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
        _operation_command(CANCEL_BACKUP_UPDATE),
        "cancel a running backup (its .partial files are removed)",
    )
    cancel.add_argument("id")
    verify = add(
        backup,
        "verify",
        _operation_command(VERIFY_BACKUP_UPDATE, result_type=str),
        "re-read a backup and check it against its manifest checksum",
    )
    verify.add_argument("id")

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
    pc.add_argument("--id", help="policy ID (default VM-DISK-INTERVAL)")
    pl = add(pol, "list", cmd_policy_list, "list policies and their next run")
    pl.add_argument("--json", action="store_true")
    pd = add(pol, "delete", cmd_policy_delete, "delete a policy (its snapshots stay)")
    pd.add_argument("id")
    pr = add(pol, "run-now", cmd_policy_run, "trigger one run of a policy now")
    pr.add_argument("id")

    rp = add(sub, "replay", cmd_replay, "replay closed workflows' histories against this code")
    rp.add_argument("--limit", type=int, default=100, help="how many closed workflows")
    rp.add_argument("--export", help="also save the histories as JSON into this directory")

    cs = add(sub, "codec-server", cmd_codec_server, "decrypt payloads for the Web UI")
    cs.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    cs.add_argument("--port", type=int, default=8081, help="port to serve on")
    cs.add_argument("--ui-origin", default="http://localhost:8233", help="CORS: the UI's origin")
    cs.add_argument("--tls-cert-file", help="serve HTTPS with this certificate (PEM)")
    cs.add_argument("--tls-key-file", help="the certificate's private key (PEM)")
    cs.add_argument(
        "--tls-client-ca-file", help="mutual TLS: require client certificates from this CA"
    )
    cs.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve without SNAPFERRY_CODEC_TOKEN_FILE or mutual TLS (loopback addresses only)",
    )
    add(sub, "codec-key", cmd_codec_key, "print a new AES-256 key for the codec keys file")

    sc = add(sub, "schema", cmd_schema, "write the payload JSON Schemas")
    sc.add_argument("--out", default="schemas", help="directory for the .json files")

    d = add(sub, "demo", cmd_demo, "the main job: demo VM, snapshot, backup, verify, serve")
    d.add_argument("--host", default=default_host(), help="the demo worker's host queue")
    d.add_argument("--size-mib", type=int, default=1024, help="the demo VM's disk size")
    explain(p)
    return p


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    try:
        return asyncio.run(args.fn(args, settings))
    except starter.SnapferryClientError as err:
        print(f"snapferry: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C is how the demo is meant to end (after its cleanup ran); elsewhere it aborts.
        return 0 if args.command == "demo" else 130
    except (ConnectionError, RuntimeError) as err:
        print(f"snapferry: error: {err}", file=sys.stderr)
        return 1


def main() -> None:
    status = run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
