"""VHD chain depth before a snapshot on XenServer, through the real XenAPI client and
tests/xapi_sim: SM refuses to snapshot a VDI whose chain is 30 VHDs deep
(``SR_BACKEND_FAILURE_109``); below that its garbage collector shortens a chain by
coalescing base copies that have one child. A take at the limit waits for the collector
when it can help, and is refused for good, saying why, when it cannot."""

from __future__ import annotations

import pytest

from snapferry.activities.contracts import (
    VmRef,
    VmSnapshotOperation,
    VmSnapshotType,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import ChainBusy, InvalidInput
from snapferry.activities.hypervisors.xenserver import XenServerDriver
from snapferry.workers.demo_vm import MIB
from tests.xapi_sim.control import create_vm, list_vdis, set_gc

from ..conftest import Xapi
from .test_xenserver import operator_session

pytestmark = pytest.mark.integration

LIMIT = 30  # SM vhdutil.MAX_CHAIN_SIZE


def volume(vm: str) -> VolumeRef:
    return VolumeRef(vm=VmRef(name=vm, host="xen-host", hypervisor="xenserver"), disk="xvda")


def vm_op(vm: str, kind: VmSnapshotType = VmSnapshotType.DISK) -> VmSnapshotOperation:
    return VmSnapshotOperation(
        snapshot_id=new_snapshot_id(),
        vm=VmRef(name=vm, host="xen-host", hypervisor="xenserver"),
        type=kind,
    )


def depth(xapi: Xapi, vdi: str) -> int:
    return next(v["depth"] for v in list_vdis(xapi.port) if v["ref"] == vdi)


def snapshots(xapi: Xapi, vdi: str) -> list[dict]:
    return [v for v in list_vdis(xapi.port) if v["snapshot_of"] == vdi]


def deepen(xapi: Xapi, vdi: str, *, keep: bool) -> list[str]:
    """29 snapshots of the disk by another tool: the chain is then 30 VHDs deep, each
    snapshot's base copy held by that snapshot (``keep``) or left for the GC."""
    kept = []
    with operator_session(xapi) as x:
        for _ in range(LIMIT - 1):
            snap = x.VDI.snapshot(vdi, {})
            if keep:
                kept.append(snap)
            else:
                x.VDI.destroy(snap)
    assert depth(xapi, vdi) == LIMIT
    return kept


def test_a_take_on_a_chain_the_gc_has_not_coalesced_waits_for_it_then_succeeds(
    xapi: Xapi,
) -> None:
    """The SR's garbage collector is stalled (an LVHD SR too full to coalesce) while the
    disk's snapshots come and go: 30 deep, with 28 base copies it could coalesce. The take
    is a transient ChainBusy naming the wait, takes no snapshot and leaves no mark; once
    the collector has run, the same take succeeds."""
    d = XenServerDriver(xapi.settings)
    vdi = create_vm(xapi.port, "deep01", [4 * MIB])["disks"][0]["vdi"]
    set_gc(xapi.port, stalled=True)
    deepen(xapi, vdi, keep=False)
    sid = new_snapshot_id()
    with pytest.raises(ChainBusy, match=r"30 VHDs deep.*garbage collector") as refused:
        d.take(volume=volume("deep01"), snapshot_id=sid)
    assert not refused.value.non_retryable
    assert not snapshots(xapi, vdi)
    with operator_session(xapi) as x:
        assert not set(x.VDI.get_other_config(vdi)) & {"snapferry-take", "snapferry-take-task"}
    assert set_gc(xapi.port, stalled=False) == LIMIT - 2
    taken = d.take(volume=volume("deep01"), snapshot_id=sid)
    assert [s["uuid"] for s in snapshots(xapi, vdi)] == [taken.image]


@pytest.mark.parametrize("take", ["volume", "vm-snapshot"])
def test_a_chain_at_the_limit_that_no_coalesce_can_shorten_is_refused_for_good(
    xapi: Xapi, take: str
) -> None:
    """29 snapshots of the disk are kept: every base copy has two children, so the GC can
    shorten nothing and no wait helps. The take (a volume's, or a VM snapshot's) is
    refused with InvalidInput saying how deep the chain is, the limit, and what would
    shorten it, before XAPI is asked to snapshot."""
    d = XenServerDriver(xapi.settings)
    vdi = create_vm(xapi.port, "deep02", [4 * MIB])["disks"][0]["vdi"]
    deepen(xapi, vdi, keep=True)
    with pytest.raises(InvalidInput, match=r"30 VHDs deep.*limit is 30.*29 snapshots"):
        if take == "volume":
            d.take(volume=volume("deep02"), snapshot_id=new_snapshot_id())
        else:
            d.take_vm_snapshot(vm_op("deep02"))
    assert len(snapshots(xapi, vdi)) == LIMIT - 1


def test_a_vm_snapshot_on_an_uncoalesced_chain_waits(xapi: Xapi) -> None:
    """A VM snapshot snapshots every disk: one disk at the limit with base copies the GC
    would coalesce makes it a ChainBusy wait, and no snapshot VM is made."""
    d = XenServerDriver(xapi.settings)
    vm = create_vm(xapi.port, "deep03", [4 * MIB, 4 * MIB])
    set_gc(xapi.port, stalled=True)
    deepen(xapi, vm["disks"][1]["vdi"], keep=False)
    op = vm_op("deep03")
    with pytest.raises(ChainBusy, match="garbage collector"):
        d.take_vm_snapshot(op)
    assert d._vm_snapshot(None, op.snapshot_id) is None
    set_gc(xapi.port, stalled=False)
    d.take_vm_snapshot(op)
    assert d._vm_snapshot(None, op.snapshot_id) is not None


def test_a_take_below_the_limit_reads_the_chain_and_snapshots(xapi: Xapi) -> None:
    """29 VHDs deep (one short of the limit) with nothing to coalesce: the take goes ahead
    and its snapshot makes the chain 30 deep."""
    d = XenServerDriver(xapi.settings)
    vdi = create_vm(xapi.port, "deep04", [4 * MIB])["disks"][0]["vdi"]
    with operator_session(xapi) as x:
        for _ in range(LIMIT - 2):
            x.VDI.snapshot(vdi, {})
    assert depth(xapi, vdi) == LIMIT - 1
    d.take(volume=volume("deep04"), snapshot_id=new_snapshot_id())
    assert depth(xapi, vdi) == LIMIT
