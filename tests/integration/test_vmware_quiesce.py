"""Quiesced VMware snapshots (``--quiesce``), against tests/vsphere_sim through the driver's
own calls, and one take through the workflows.

vSphere quiesces with VMware Tools when CreateSnapshot_Task is asked ``quiesce=True`` and
the VM runs; where Tools are not available it ignores the flag and takes a crash-consistent
snapshot anyway (vSphere API reference, CreateSnapshot_Task). So the driver reads
``guest.toolsRunningStatus`` first, reads ``SnapshotTree.quiesced`` after, and turns a quiesce
fault into the refusal (``yes``) or a crash-consistent retry that says why (``try``):

- Tools running: ``yes`` and ``try`` give an application-consistent volume snapshot and VM
  snapshot (their vSphere snapshot says ``quiesced``); ``no`` a crash-consistent one.
- Tools not running, or not installed: ``yes`` is refused before anything is taken,
  ``try`` is crash-consistent with the reason.
- A quiesce fault (ApplicationQuiesceFault, FilesystemQuiesceFault): ``yes`` is refused and
  leaves nothing, ``try`` is taken again without quiesce and says why.
- A stopped VM is application-consistent without Tools.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from pyVim.connect import Disconnect
from temporalio.client import Client

from snapferry.activities.contracts import (
    Consistency,
    Quiesce,
    SnapshotState,
    VmRef,
    VmSnapshotOperation,
    VmSnapshotType,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import QuiesceUnavailable
from snapferry.activities.hypervisors.vmware import VmwareDriver
from snapferry.workers import starter
from snapferry.workers.worker import running_workers
from tests.vsphere_sim.control import create_vm, guest_write, list_vms, set_guest, soap_calls

from ..conftest import Vsphere
from .test_vmware import vmware_request
from .test_vmware_clones import connect, volume
from .test_vmware_disk_copy import Sim, sim
from .test_vmware_govmomi import Govmomi, govmomi
from .test_vmware_govmomi import create_vm as govmomi_vm
from .test_vmware_govmomi import wait as govmomi_wait

__all__ = ["govmomi", "sim"]

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def calls(sim: Sim, method: str) -> int:
    return soap_calls(sim.port).get(method, 0)


def tree(sim: Sim, vm: str) -> list[Any]:
    """The VM's snapshot tree nodes, as a vSphere client reads them."""
    si = connect(sim)
    try:
        target = si.RetrieveContent().searchIndex.FindByInventoryPath(f"dc1/vm/{vm}")
        info = target.snapshot
        stack, out = list(info.rootSnapshotList) if info else [], []
        while stack:
            node = stack.pop()
            out.append((node.name, node.quiesced))
            stack.extend(node.childSnapshotList or [])
        return out
    finally:
        Disconnect(si)


def vm_op(name: str, quiesce: Quiesce, kind: VmSnapshotType = VmSnapshotType.DISK) -> Any:
    return VmSnapshotOperation(
        snapshot_id=new_snapshot_id(),
        vm=VmRef(name=name, host="vc1", hypervisor="vmware"),
        type=kind,
        quiesce=quiesce,
    )


@pytest.mark.parametrize("quiesce", [Quiesce.YES, Quiesce.TRY])
def test_with_tools_running_a_quiesced_take_is_application_consistent(
    sim: Sim, quiesce: Quiesce
) -> None:
    """The volume's clone comes from a snapshot vSphere quiesced, and the VM snapshot stays
    with ``quiesced`` set; both records say application."""
    create_vm(sim.port, "qs01", [4 * MIB])
    guest_write(sim.port, "qs01", 0, b"\x11" * MIB)
    driver = VmwareDriver(sim.settings)
    primary = driver.take(
        volume=volume("qs01", "qs01"), snapshot_id=new_snapshot_id(), quiesce=quiesce
    )
    assert (primary.consistency, primary.consistency_note) == (Consistency.APPLICATION, None)
    op = vm_op("qs01", quiesce)
    taken = driver.take_vm_snapshot(op)
    assert (taken.consistency, taken.consistency_note) == (Consistency.APPLICATION, None)
    assert tree(sim, "qs01") == [(f"snapferry-vm-{op.snapshot_id}", True)]


def test_without_quiesce_the_take_is_crash_consistent_and_asks_nothing_of_tools(
    sim: Sim,
) -> None:
    create_vm(sim.port, "qs02", [4 * MIB])
    driver = VmwareDriver(sim.settings)
    primary = driver.take(volume=volume("qs02", "qs02"), snapshot_id=new_snapshot_id())
    assert (primary.consistency, primary.consistency_note) == (Consistency.CRASH, None)
    op = vm_op("qs02", Quiesce.NO)
    taken = driver.take_vm_snapshot(op)
    assert (taken.consistency, taken.consistency_note) == (Consistency.CRASH, None)
    assert tree(sim, "qs02") == [(f"snapferry-vm-{op.snapshot_id}", False)]


@pytest.mark.parametrize(
    ("tools", "reason"),
    [("notRunning", "VMware Tools is not running"), ("notInstalled", "not installed")],
)
def test_without_tools_yes_is_refused_before_anything_and_try_says_why(
    sim: Sim, tools: str, reason: str
) -> None:
    create_vm(sim.port, "qs03", [4 * MIB])
    set_guest(sim.port, "qs03", tools=tools)
    driver = VmwareDriver(sim.settings)
    with pytest.raises(QuiesceUnavailable, match=reason):
        driver.take(
            volume=volume("qs03", "qs03"), snapshot_id=new_snapshot_id(), quiesce=Quiesce.YES
        )
    with pytest.raises(QuiesceUnavailable, match=reason):
        driver.take_vm_snapshot(vm_op("qs03", Quiesce.YES))
    assert calls(sim, "CreateSnapshot_Task") == 0 and calls(sim, "CloneVM_Task") == 0
    assert sim.vm("qs03")["snapshots"] == []
    primary = driver.take(
        volume=volume("qs03", "qs03"), snapshot_id=new_snapshot_id(), quiesce=Quiesce.TRY
    )
    assert primary.consistency == Consistency.CRASH
    assert reason in (primary.consistency_note or ""), primary.consistency_note
    taken = driver.take_vm_snapshot(vm_op("qs03", Quiesce.TRY))
    assert taken.consistency == Consistency.CRASH and reason in (taken.consistency_note or "")


@pytest.mark.parametrize("fault", ["ApplicationQuiesceFault", "FilesystemQuiesceFault"])
def test_a_quiesce_fault_refuses_yes_leaving_nothing_and_retries_try_without(
    sim: Sim, fault: str
) -> None:
    """The fault comes at snapshot time, after Tools said they run: ``yes`` leaves no
    snapshot and no clone; ``try`` takes the snapshot again without quiesce, and its clone
    holds the disk's bytes."""
    create_vm(sim.port, "qs04", [4 * MIB])
    guest_write(sim.port, "qs04", MIB, b"\x5a" * MIB)
    driver = VmwareDriver(sim.settings)
    set_guest(sim.port, "qs04", quiesce_fails=2, quiesce_fault=fault)
    with pytest.raises(QuiesceUnavailable, match=fault):
        driver.take(
            volume=volume("qs04", "qs04"), snapshot_id=new_snapshot_id(), quiesce=Quiesce.YES
        )
    with pytest.raises(QuiesceUnavailable, match=fault):
        driver.take_vm_snapshot(vm_op("qs04", Quiesce.YES))
    assert sim.vm("qs04")["snapshots"] == [] and calls(sim, "CloneVM_Task") == 0
    assert [v["name"] for v in list_vms(sim.port)] == ["qs04"]
    set_guest(sim.port, "qs04", quiesce_fails=2)
    before = calls(sim, "CreateSnapshot_Task")
    sid = new_snapshot_id()
    primary = driver.take(volume=volume("qs04", "qs04"), snapshot_id=sid, quiesce=Quiesce.TRY)
    assert primary.consistency == Consistency.CRASH
    assert fault in (primary.consistency_note or ""), primary.consistency_note
    assert calls(sim, "CreateSnapshot_Task") - before == 2  # quiesced, then not
    reader = driver.open_reader(primary, _full())
    try:
        extent = next(iter(reader.data_extents()))
        buf = bytearray(MIB)
        reader.read_range(extent, MIB, memoryview(buf))
        assert bytes(buf) == b"\x5a" * MIB
    finally:
        reader.close()
    op = vm_op("qs04", Quiesce.TRY)
    taken = driver.take_vm_snapshot(op)
    assert taken.consistency == Consistency.CRASH and fault in (taken.consistency_note or "")
    assert tree(sim, "qs04") == [(f"snapferry-vm-{op.snapshot_id}", False)]


def test_a_retried_take_whose_snapshot_was_not_quiesced_refuses_yes(sim: Sim) -> None:
    """vSphere ignores ``quiesce`` where Tools are not available and takes the snapshot
    anyway, crash-consistent, with ``quiesced`` false in the tree (Tools that stopped
    between the driver's look and the snapshot). A take that finds such a snapshot (its own
    earlier attempt's) refuses yes and removes it; nothing is left."""
    create_vm(sim.port, "qs05", [4 * MIB])
    op = vm_op("qs05", Quiesce.YES)
    si = connect(sim)
    try:
        target = si.RetrieveContent().searchIndex.FindByInventoryPath("dc1/vm/qs05")
        task = target.CreateSnapshot_Task(
            name=f"snapferry-vm-{op.snapshot_id}", description="", memory=False, quiesce=False
        )
        while task.info.state not in ("success", "error"):
            time.sleep(0.02)
    finally:
        Disconnect(si)
    driver = VmwareDriver(sim.settings)
    with pytest.raises(QuiesceUnavailable, match="not quiesced"):
        driver.take_vm_snapshot(op)
    assert sim.vm("qs05")["snapshots"] == []


def test_a_stopped_vm_is_application_consistent_without_tools(sim: Sim) -> None:
    create_vm(sim.port, "qs06", [4 * MIB], power="poweredOff")
    set_guest(sim.port, "qs06", tools="notInstalled")
    driver = VmwareDriver(sim.settings)
    primary = driver.take(
        volume=volume("qs06", "qs06"), snapshot_id=new_snapshot_id(), quiesce=Quiesce.YES
    )
    assert primary.consistency == Consistency.APPLICATION
    assert "stopped" in (primary.consistency_note or "")
    taken = driver.take_vm_snapshot(vm_op("qs06", Quiesce.YES))
    assert taken.consistency == Consistency.APPLICATION and "stopped" in (
        taken.consistency_note or ""
    )
    assert not primary.vm_was_running and not taken.vm_was_running


async def test_snapshot_create_with_quiesce_records_its_consistency(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """Through the workflows: ``yes`` with Tools running is application-consistent in the
    record; ``yes`` without Tools fails the take (non-retryable) and leaves nothing."""
    create_vm(vsphere.port, "qs07", [4 * MIB])
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        request = vmware_request("qs07", "qs07", host_name, vsphere)
        answer = await starter.create_snapshot(
            client, request.model_copy(update={"quiesce": Quiesce.YES})
        )
        record = await starter.wait_settled(client, answer.id)
        assert record.state == SnapshotState.BACKED_UP, record
        assert record.consistency == Consistency.APPLICATION
        set_guest(vsphere.port, "qs07", tools="notRunning")
        request = vmware_request("qs07", "qs07", host_name, vsphere)
        with pytest.raises(starter.SnapferryClientError, match="VMware Tools is not running"):
            await starter.create_snapshot(
                client, request.model_copy(update={"quiesce": Quiesce.YES})
            )
        await client.get_workflow_handle(f"volume-snapshot-{request.snapshot_id}").result()
    assert vsphere.snapshot_names("qs07") == [] and vsphere.vm_names() == {"qs07"}


def _full() -> Any:
    from snapferry.activities.contracts import BackupPlan

    return BackupPlan()


def test_against_govmomis_simulator_a_guest_without_tools_is_not_quiesced(
    govmomi: Govmomi,
) -> None:
    """govmomi's simulator (0.24.2) gives a VM made with CreateVM_Task no Tools
    (simulator/folder.go: toolsStatus toolsNotInstalled, toolsRunningStatus
    guestToolsNotRunning), yet records any snapshot asked ``quiesce=True`` as quiesced
    (simulator/virtual_machine.go, CreateSnapshotTask: ``Quiesced: req.Quiesce``), where
    vSphere ignores the flag without Tools. The driver asks Tools first, so there too yes
    is refused before anything is taken and try is crash-consistent, saying why."""
    si = govmomi.connect()
    try:
        vm = govmomi_vm(si, "qg01", 4 * MIB)
        govmomi_wait(vm.PowerOnVM_Task())
        driver = VmwareDriver(govmomi.settings)
        ref = VolumeRef(vm=VmRef(name="qg01", host="vc1", hypervisor="vmware"), disk="qg01")
        with pytest.raises(QuiesceUnavailable, match="not installed"):
            driver.take(volume=ref, snapshot_id=new_snapshot_id(), quiesce=Quiesce.YES)
        with pytest.raises(QuiesceUnavailable, match="not installed"):
            driver.take_vm_snapshot(vm_op("qg01", Quiesce.YES))
        assert vm.snapshot is None
        sid = new_snapshot_id()
        primary = driver.take(volume=ref, snapshot_id=sid, quiesce=Quiesce.TRY)
        assert primary.consistency == Consistency.CRASH
        assert "not installed" in (primary.consistency_note or "")
        driver.release(volume=ref, snapshot_id=sid, source=primary)
        # What the simulator itself does with quiesce=True and no Tools:
        snap = govmomi_wait(vm.CreateSnapshot_Task("direct", "", memory=False, quiesce=True))
        assert vm.guest.toolsRunningStatus == "guestToolsNotRunning"
        assert [n.quiesced for n in vm.snapshot.rootSnapshotList] == [True]
        govmomi_wait(snap.RemoveSnapshot_Task(removeChildren=False))
    finally:
        Disconnect(si)
