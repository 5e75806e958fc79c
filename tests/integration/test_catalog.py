"""The catalog at scale: ``snapshot list`` filters thousands of snapshots by VM, volume and
state through visibility, without waking a single workflow."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    SnapshotRequest,
    SnapshotState,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.workers import starter
from snapferry.workflows.routing import CONTROL_QUEUE, snapshot_workflow_id
from snapferry.workflows.snapshot import VolumeSnapshotWorkflow, search_attributes

from ..conftest import snapferry_cli

pytestmark = pytest.mark.integration

COUNT = 2000
VMS = [f"vm{i}" for i in range(10)]
DISKS = ["vda", "vdb"]
STATES = [SnapshotState.BACKED_UP, SnapshotState.CREATED_ON_PRIMARY, SnapshotState.DESTROYED]


async def test_list_filters_thousands_of_snapshots(client: Client, settings) -> None:
    """No worker runs here, so each workflow keeps the search attributes it was started
    with: a catalog of 2000 snapshots in a known spread of VMs, disks and states."""
    expected: dict[tuple[str, str, str], int] = {}

    async def start(i: int) -> None:
        vm, disk, state = VMS[i % 10], DISKS[i % 2], STATES[i % 3]
        req = SnapshotRequest(
            snapshot_id=new_snapshot_id(),
            volume=VolumeRef(vm=VmRef(name=vm, host="h1"), disk=disk),
        )
        await client.start_workflow(
            VolumeSnapshotWorkflow.run,
            req,
            id=snapshot_workflow_id(req.snapshot_id),
            task_queue=CONTROL_QUEUE,
            search_attributes=search_attributes(req, state),
        )
        expected[(vm, disk, state.value)] = expected.get((vm, disk, state.value), 0) + 1

    for batch in range(0, COUNT, 200):
        await asyncio.gather(*(start(i) for i in range(batch, batch + 200)))

    t0 = time.monotonic()
    for _ in range(100):  # visibility is eventually consistent: wait until all are seen
        rows = await starter.list_snapshots(client)
        if len(rows) == COUNT:
            break
        await asyncio.sleep(0.2)
    elapsed = time.monotonic() - t0
    assert len(rows) == COUNT and len({r["id"] for r in rows}) == COUNT
    print(f"\nlisted {COUNT} snapshots in {elapsed:.2f}s (including visibility catch-up)")

    by_vm = await starter.list_snapshots(client, vm="vm3")
    assert len(by_vm) == sum(n for (vm, _, _), n in expected.items() if vm == "vm3")
    assert {r["vm"] for r in by_vm} == {"vm3"}
    by_volume = await starter.list_snapshots(client, vm="vm3", disk="vdb")
    assert len(by_volume) == sum(
        n for (vm, disk, _), n in expected.items() if (vm, disk) == ("vm3", "vdb")
    )
    assert {(r["vm"], r["disk"]) for r in by_volume} == {("vm3", "vdb")}
    by_state = await starter.list_snapshots(client, state="BackedUp")
    assert len(by_state) == sum(n for (_, _, s), n in expected.items() if s == "BackedUp")
    all_three = await starter.list_snapshots(client, vm="vm4", disk="vda", state="Destroyed")
    assert len(all_three) == expected.get(("vm4", "vda", "Destroyed"), 0)
    assert {(r["vm"], r["disk"], r["state"]) for r in all_three} <= {("vm4", "vda", "Destroyed")}

    # The same through the CLI, with --json; and a disk without its VM is refused.
    proc = await snapferry_cli("snapshot", "list", "--vm", "vm3", "--disk", "vdb", "--json")
    assert proc.returncode == 0 and len(json.loads(proc.stdout)) == len(by_volume)
    no_vm = await snapferry_cli("snapshot", "list", "--disk", "vdb")
    assert no_vm.returncode == 1 and "needs --vm" in no_vm.stderr
