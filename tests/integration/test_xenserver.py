"""XenServer through the real XenAPI client against tests/xapi_sim (a separate process with
XAPI's XML-RPC envelope, tasks and error codes, and its VHD export/import endpoints)."""

from __future__ import annotations

import random

import pytest
from temporalio.client import Client

from activities.contracts import (
    HypervisorType,
    SnapshotRequest,
    SnapshotState,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from activities.storage.secondary import SecondaryStore
from tests.xapi_sim.control import create_vm, guest_write
from workers import starter
from workers.demo_vm import MIB
from workers.worker import running_workers

from ..conftest import Xapi

pytestmark = pytest.mark.integration

BLOCK = 2 * MIB  # a VHD block: the grain of a delta


def xen_request(vm: str, host: str, xapi: Xapi, disk: str = "xvda") -> SnapshotRequest:
    return SnapshotRequest(
        snapshot_id=new_snapshot_id(),
        volume=VolumeRef(
            vm=VmRef(name=vm, host=host, hypervisor=HypervisorType.XENSERVER), disk=disk
        ),
        backup=xapi.settings.backup_defaults,
    )


async def test_full_and_deltas_restore_exactly_and_roll_over(
    client: Client, xapi: Xapi, host_name: str
) -> None:
    """Six snapshots with delta.max = 3: full, 3 deltas, full, delta. Each backup, rebuilt
    from its chain, equals the VDI at its snapshot time; each delta carries only the blocks
    that changed (1 % of the volume changed -> at most 3 % of a full)."""
    size = 256 * MIB
    create_vm(xapi.port, "xen01", [size])
    rng = random.Random(7)
    for offset in range(0, size, 8 * MIB):  # data over the whole disk
        guest_write(xapi.port, "xen01", offset, rng.randbytes(MIB))
    expected: dict[str, bytes] = {}
    async with running_workers(client, xapi.settings, hosts=[host_name], backup=True):
        for i in range(6):
            if i:  # change 1 % of the volume, contiguous, between snapshots
                change = size // 100
                offset = rng.randrange(0, size - change, BLOCK)
                guest_write(xapi.port, "xen01", offset, rng.randbytes(change))
            answer = await starter.create_snapshot(client, xen_request("xen01", host_name, xapi))
            assert answer.state == SnapshotState.CREATED_ON_PRIMARY
            expected[answer.id] = xapi.disk("xen01").read_bytes()
            record = await starter.wait_settled(client, answer.id)
            assert record.state == SnapshotState.BACKED_UP and record.backup
    store = SecondaryStore(xapi.settings.secondary)
    manifests = {
        m.snapshot_id: m
        for m in store.completed(
            VolumeRef(vm=VmRef(name="xen01", host=host_name, hypervisor="xenserver"), disk="xvda")
        )
    }
    ids = list(expected)
    assert [manifests[i].depth for i in ids] == [0, 1, 2, 3, 0, 1]  # rolls over after 3
    assert [manifests[i].parent for i in ids] == [None, ids[0], ids[1], ids[2], None, ids[4]]
    full = manifests[ids[0]].data_bytes
    for sid in ids:
        with SecondaryStore.materialized(manifests[sid]) as raw:
            assert raw.read_bytes() == expected[sid], f"chain of {sid} does not rebuild"
        m = manifests[sid]
        if m.parent is not None:
            ratio = m.data_bytes / full
            assert ratio <= 0.03, f"delta {sid} carries {ratio:.1%} of a full backup"
            print(f"delta depth {m.depth}: {m.data_bytes / MIB:.0f} MiB = {ratio:.2%} of full")
    # Only the newest backed-up snapshot stays on primary, as the next delta's base.
    left = [v for v in xapi.snapshot_vdis() if v["name"].startswith("snapferry-")]
    assert [v["name"] for v in left] == [f"snapferry-{ids[-1]}"]
