"""What every command group shares: the client, printing, help texts, argument helpers."""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from snapferry.activities.contracts import (
    HypervisorType,
    Quiesce,
    SnapshotRecord,
    VmSnapshotRecord,
    validate_name,
)
from snapferry.activities.settings import Settings

from .. import starter
from ..client import connect

Adder = Callable[[Any, str, Callable[..., Awaitable[int]], str], Any]
"""``add(parent, name, command, help)``: one subcommand, its help shown with defaults."""


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
        print(
            "  primary: handed back after the verified backup (the newest one's layer or VDI"
            " stays as the next delta's base until a newer backup or its delete)"
        )
    elif record.primary:
        print(f"  primary: {record.primary.image} (overlay {record.primary.overlay})")
    if record.primary:
        print_consistency(record.primary.consistency.value, record.primary.consistency_note)
    if record.backup:
        b = record.backup
        kind = f"delta of {b.parent} (depth {b.depth})" if b.parent else "full"
        print(f"  backup:  {b.path}\n  kind:    {kind}, {b.bytes_stored} bytes stored")
        if b.full_reason:
            print(f"  full because {b.full_reason}")
        print(f"  checksum {b.checksum}")
    if record.verified_boot:
        v = record.verified_boot
        said = f"boots ({v.sign}, {v.seconds:.1f} s)" if v.ok else f"did NOT boot: {v.detail}"
        print(f"  boot check {v.at:%Y-%m-%d %H:%M:%S}Z: {said}")
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
        print_consistency(record.taken.consistency.value, record.taken.consistency_note)
    if record.error:
        print(f"  error: {record.error}")


def print_consistency(consistency: str, note: str | None) -> None:
    print(f"  consistency: {consistency}" + (f" ({note})" if note else ""))


def add_quiesce_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quiesce",
        nargs="?",
        const=Quiesce.YES.value,
        default=Quiesce.NO.value,
        choices=[q.value for q in Quiesce],
        help="freeze the guest's file systems for the snapshot (application-consistent):"
        " --quiesce (or =yes) refuses when the guest cannot be quiesced, --quiesce=try falls"
        " back to crash-consistent and says so in the record",
    )


def add_check_boot_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check-boot",
        action="store_true",
        help="once backed up, boot a throwaway VM from the backup and record whether it"
        " showed a sign of life (KVM; see snapshot check)",
    )


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
        if r.get("backup") == "delta":
            print(f"    delta of {r['parent']} (depth {r['depth']}), {r['stored_bytes']} bytes")
        elif r.get("backup") == "full":
            print(f"    full, {r['stored_bytes']} bytes")
        if r.get("backup_error"):
            print(f"    last backup error: {r['backup_error']}")


def web_ui_link(settings: Settings, workflow_id: str) -> str:
    """The snapshot's workflow in the Web UI (``SNAPFERRY_UI_URL`` for a cluster's UI)."""
    base = os.environ.get("SNAPFERRY_UI_URL") or f"http://127.0.0.1:{settings.ui_port}"
    return f"{base.rstrip('/')}/namespaces/{settings.namespace}/workflows/{workflow_id}"


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


def operation_command(
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


def validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    return "invalid input: " + "; ".join(parts)


M = TypeVar("M", bound=BaseModel)


def parse_input(model: type[M], data: dict[str, Any]) -> M:
    """What an operator typed, as the contract it must be; refused naming each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise starter.SnapferryClientError(validation_message(err)) from err


def check_names(**options: str | None) -> None:
    """Names typed for a lookup or a filter (``--vm``, ``--disk``, a policy ID), refused as
    :func:`parse_input` refuses a request's, naming each bad option: a name goes into a
    visibility query or a schedule ID, where ``../../x`` or a quote must never reach."""
    bad = []
    for option, value in options.items():
        if value is None:
            continue
        try:
            validate_name(value)
        except ValueError as err:
            bad.append(f"{option.replace('_', '-')}: {err}")
    if bad:
        raise starter.SnapferryClientError("invalid input: " + "; ".join(bad))


def given_or(value: str | None, default: str) -> str:
    """An option's value when it was given at all (an empty ``--id ''`` is refused by the
    validation, never replaced by the default), else ``default``."""
    return default if value is None else value


def add_volume_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm", required=True)
    parser.add_argument("--disk", required=True)
    parser.add_argument("--host", default=default_host())
    parser.add_argument("--hypervisor", default="kvm", choices=[h.value for h in HypervisorType])


def volume_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The volume as a plain dict, validated with the rest of its request."""
    return {
        "vm": {"name": args.vm, "host": args.host, "hypervisor": args.hypervisor},
        "disk": args.disk,
    }


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
    " 130 interrupted. Configuration comes from SNAPFERRY_* environment variables"
    " (docs/operating/configuration.md)."
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
