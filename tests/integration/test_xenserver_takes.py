"""Volume takes on XenServer next to other tools, through the real XenAPI client and
tests/xapi_sim. ``VDI.snapshot`` reads the source's record when it begins and copies its
other_config onto the snapshot when it ends (``xapi_vdi.ml`` ``snapshot_and_clone``), and
``VM.snapshot`` snapshots every disk the same way, so any snapshot another client takes of
the disk while a take runs inherits whatever mark the take put on the source."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from snapferry.activities.contracts import (
    DiscardRequest,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import HypervisorUnavailable
from snapferry.activities.hypervisors.xenserver import XenServerDriver
from snapferry.workers.demo_vm import MIB
from tests.xapi_sim.control import create_vm, inject_fault, list_vdis, set_task_delay

from ..conftest import Xapi
from .test_xenserver import operator_session

pytestmark = pytest.mark.integration


def volume(vm: str, disk: str = "xvda") -> VolumeRef:
    return VolumeRef(vm=VmRef(name=vm, host="xen-host", hypervisor="xenserver"), disk=disk)


def snapshots_of(xapi: Xapi, vdi_uuid: str) -> list[dict]:
    vdis = list_vdis(xapi.port)
    source = next(v for v in vdis if v["uuid"] == vdi_uuid)
    return [v for v in vdis if v["snapshot_of"] == source["ref"]]


def test_another_clients_vm_snapshot_during_a_take_is_never_adopted_or_destroyed(
    xapi: Xapi,
) -> None:
    """While the take's ``Async.VDI.snapshot`` runs, another client (Xen Orchestra, say)
    snapshots the VM. Its disk's snapshot is not labelled as ours, keeps no mark of ours,
    and survives the release and the discard of the take."""
    d = XenServerDriver(xapi.settings)
    vm = create_vm(xapi.port, "mark01", [8 * MIB])
    sid = new_snapshot_id()
    set_task_delay(xapi.port, 1.0)
    with ThreadPoolExecutor(1) as pool, operator_session(xapi) as x:
        taking = pool.submit(d.take, volume=volume("mark01"), snapshot_id=sid)
        time.sleep(0.4)  # the take's snapshot is under way
        foreign = x.VM.snapshot(vm["ref"], "xo-backup-temp-snapshot-name")
        taken = taking.result(timeout=30)
        set_task_delay(xapi.port, 0)
        (vbd,) = x.VM.get_VBDs(foreign)
        theirs = x.VBD.get_VDI(vbd)
        their_label = x.VDI.get_name_label(theirs)
        assert their_label == "mark01 disk 0"  # the source's, as XAPI copies it
        assert not any(k.startswith("snapferry") for k in x.VDI.get_other_config(theirs))
        assert not any(
            k.startswith("snapferry") for k in x.VDI.get_other_config(vm["disks"][0]["vdi"])
        )
        d.release(volume=volume("mark01"), snapshot_id=sid, source=taken, backed_up=False)
        d.discard(DiscardRequest(snapshot_id=sid, vm=volume("mark01").vm))
        assert x.VDI.get_name_label(theirs) == their_label  # still there, still theirs
        assert x.VM.get_VBDs(foreign) == [vbd]
    left = snapshots_of(xapi, vm["disks"][0]["vdi_uuid"])
    assert [v["ref"] for v in left] == [theirs]


def test_a_take_whose_task_poll_broke_is_finished_by_its_retry_with_one_snapshot(
    xapi: Xapi,
) -> None:
    """The connection breaks while the take polls its ``Async.VDI.snapshot`` task (the task
    goes on in XAPI). The retry waits for that same task and adopts its snapshot: one
    snapshot VDI in the end, labelled, marked as ours, and the source unmarked."""
    d = XenServerDriver(xapi.settings)
    vm = create_vm(xapi.port, "mark02", [8 * MIB])
    sid = new_snapshot_id()
    set_task_delay(xapi.port, 1.0)
    inject_fault(xapi.port, "task.get_status", "INTERNAL_ERROR", ["connection reset"])
    with pytest.raises(HypervisorUnavailable):
        d.take(volume=volume("mark02"), snapshot_id=sid)
    taken = d.take(volume=volume("mark02"), snapshot_id=sid)  # the retry, at once
    set_task_delay(xapi.port, 0)
    time.sleep(1.5)  # anything still running in XAPI has ended
    snaps = snapshots_of(xapi, vm["disks"][0]["vdi_uuid"])
    assert [v["uuid"] for v in snaps] == [taken.image]
    assert snaps[0]["name"] == f"snapferry-{sid}"
    with operator_session(xapi) as x:
        assert not any(k == "snapferry-take" for k in x.VDI.get_other_config(vm["disks"][0]["vdi"]))
        assert x.VDI.get_other_config(snaps[0]["ref"]).get("snapferry-snapshot") == sid
