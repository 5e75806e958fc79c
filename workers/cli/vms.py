"""``snapferry vm-snapshot ...`` and ``snapferry vm moved``: VM snapshots, and the VM itself."""

from __future__ import annotations

import argparse
from typing import Any

from snapferry.activities.contracts import (
    HypervisorType,
    VmSnapshotRecord,
    VmSnapshotRequest,
    VmSnapshotState,
    VmSnapshotType,
    new_snapshot_id,
)
from snapferry.activities.settings import Settings
from snapferry.workflows.vm_snapshot import DELETE_VM_SNAPSHOT_UPDATE, REVERT_VM_SNAPSHOT_UPDATE

from .. import starter
from .common import (
    Adder,
    add_quiesce_arg,
    check_names,
    cli_client,
    default_host,
    given_or,
    operation_command,
    parse_input,
    print_rows,
    print_vm_record,
    web_ui_link,
)


async def cmd_vm_moved(args: argparse.Namespace, settings: Settings) -> int:
    from ..policies import move_policies

    check_names(vm=args.vm, host=args.host)
    client = await cli_client(settings)
    # The policies first: a refusal among the snapshots below must not leave the next
    # tick on the old host.
    policies = await move_policies(client, vm=args.vm, host=args.host)
    print(f"{len(policies)} policy(ies) of {args.vm} now take its snapshots on {args.host}")
    for policy_id in policies:
        print(f"  {policy_id}")
    moved = await starter.move_vm(client, vm=args.vm, host=args.host)
    print(f"{len(moved)} live snapshot(s) of {args.vm} now follow it on host {args.host}")
    for wf_id in moved:
        print(f"  {wf_id}")
    return 0


async def cmd_vm_snapshot_create(args: argparse.Namespace, settings: Settings) -> int:
    req = parse_input(
        VmSnapshotRequest,
        {
            "snapshot_id": given_or(args.id, new_snapshot_id()),
            "vm": {"name": args.vm, "host": args.host, "hypervisor": args.hypervisor},
            "type": args.type,
            "name": args.name,
            "quiesce": args.quiesce,
        },
    )
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
    check_names(vm=args.vm)
    rows = await starter.list_snapshots(
        await cli_client(settings), vm=args.vm, state=args.state, kind=starter.VM
    )
    print_rows(rows, args.json)
    return 0


def register(sub: Any, add: Adder) -> None:
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
    add_quiesce_arg(vc)
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
        command = operation_command(update, result_type=VmSnapshotRecord, kind=starter.VM)
        op = add(vsub, name, command, help_)
        op.add_argument("id")
        op.add_argument("--json", action="store_true")

    vmc = sub.add_parser("vm", help="the VM itself").add_subparsers(dest="action", required=True)
    mv = add(
        vmc,
        "moved",
        cmd_vm_moved,
        "after a live migration: send the VM's live snapshots' host operations, and its"
        " policies' later snapshots, to its new host",
    )
    mv.add_argument("--vm", required=True, help="the VM that moved")
    mv.add_argument("--host", required=True, help="the host it runs on now")
