"""``snapferry snapshot run ID --as NAME``: a new VM running from a backup, at once.

It starts the InstantRestore workflow (workflows/instant.py) on the snapshot's host and
returns once the VM runs; the copy of the backup into the VM's own disk goes on in the
workflow, which the Web UI shows with its progress.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowFailureError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from snapferry.activities.contracts import InstantRunRequest, SnapshotState
from snapferry.activities.settings import Settings
from snapferry.workflows.entity import cause_message
from snapferry.workflows.instant import (
    FAILED,
    STARTING,
    InstantRestoreWorkflow,
    instant_workflow_id,
)
from snapferry.workflows.routing import CONTROL_QUEUE

from .. import starter
from .common import Adder, cli_client, parse_input, web_ui_link

START_WAIT_S = 600.0


async def cmd_snapshot_run(args: argparse.Namespace, settings: Settings) -> int:
    client = await cli_client(settings)
    record = await starter.get_record(client, args.id)
    if record.state != SnapshotState.BACKED_UP or record.backup is None or record.primary is None:
        raise starter.SnapferryClientError(
            f"snapshot {args.id} is {record.state.value}: only a BackedUp snapshot's backup"
            " can run a VM"
        )
    req = parse_input(
        InstantRunRequest,
        {
            "snapshot_id": record.id,
            "volume": {
                "vm": {"name": record.vm, "host": record.host, "hypervisor": record.hypervisor},
                "disk": record.disk,
            },
            "manifest_path": record.backup.manifest_path,
            "primary_dir": str(Path(record.primary.image).parent),
            "name": args.as_name,
            "memory_mib": args.memory,
        },
    )
    workflow_id = instant_workflow_id(req.name)
    t0 = time.monotonic()
    try:
        handle = await client.start_workflow(
            InstantRestoreWorkflow.run,
            req,
            id=workflow_id,
            task_queue=CONTROL_QUEUE,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            static_summary=f"Instant restore of {record.vm}/{record.disk} as {req.name}",
        )
    except WorkflowAlreadyStartedError as err:
        raise starter.SnapferryClientError(
            f"an instant restore named {req.name!r} exists already (workflow {workflow_id})"
        ) from err
    deadline = t0 + START_WAIT_S
    while True:
        state, error = await handle.query(InstantRestoreWorkflow.current)
        if state == FAILED:
            raise starter.SnapferryClientError(f"VM {req.name} did not start: {error}")
        if state != STARTING:
            break
        desc = await handle.describe()
        if desc.status is not None and desc.status.name != "RUNNING":
            try:
                await handle.result()
            except WorkflowFailureError as err:
                raise starter.SnapferryClientError(
                    f"VM {req.name} did not start: {cause_message(err.cause)}"
                ) from err
            break
        if time.monotonic() > deadline:
            raise starter.SnapferryClientError(f"VM {req.name} did not start in time")
        await asyncio.sleep(0.2)
    print(
        f"VM {req.name} is running from snapshot {args.id}'s backup"
        f" ({time.monotonic() - t0:.1f} s); its disk is copied in meanwhile:"
        f" {web_ui_link(settings, workflow_id)}"
    )
    if args.wait:
        result = await handle.result()
        print(f"VM {req.name} runs on its own disk {result.overlay} ({result.copy_seconds:.0f} s)")
    return 0


def register_instant(snap: Any, add: Adder) -> None:
    r = add(
        snap,
        "run",
        cmd_snapshot_run,
        "instant restore: start a new VM on the backup at once (KVM), copying it in meanwhile",
    )
    r.add_argument("id")
    r.add_argument("--as", dest="as_name", required=True, metavar="NAME", help="the new VM")
    r.add_argument(
        "--memory", type=int, default=512, metavar="MIB", help="if the original VM is gone"
    )
    r.add_argument("--wait", action="store_true", help="return once the copy is done")
