"""Snapshot removals that leave redo logs behind (``runtime.consolidationNeeded``), against
tests/vsphere_sim: the driver consolidates after every removal, or alerts; a volume revert
refuses a disk still on a delta and never writes a new ``-00000N-flat.vmdk``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    VmRef,
    VmSnapshotOperation,
    VmSnapshotType,
    new_snapshot_id,
)
from snapferry.activities.hypervisors.vmware import VmwareDriver
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from tests.vsphere_sim.control import create_vm, guest_write, list_vms, set_inventory, soap_calls

from ..conftest import Vsphere
from .test_vmware import fill, power, vmware_request
from .test_vmware_clones import volume
from .test_vmware_disk_copy import Sim, sim

__all__ = ["sim"]

pytestmark = pytest.mark.integration


def vm_state(port: int, name: str) -> dict:
    return next(v for v in list_vms(port) if v["name"] == name)


def test_a_removal_that_leaves_a_delta_is_consolidated_by_the_take(sim: Sim) -> None:
    """The take's temporary snapshot goes, but its redo log stays (consolidationNeeded):
    the take consolidates, and the VM is back on its base disk before the answer."""
    set_inventory(sim.port, leave_deltas=True)
    create_vm(sim.port, "cn01", [4 * MIB])
    VmwareDriver(sim.settings).take(volume=volume("cn01", "cn01"), snapshot_id=new_snapshot_id())
    vm = vm_state(sim.port, "cn01")
    assert vm["snapshots"] == [] and vm["chains"] == [["cn01.vmdk"]]
    assert not vm["consolidation_needed"]
    assert soap_calls(sim.port).get("ConsolidateVMDisks_Task") == 1


def test_a_consolidation_that_fails_is_alerted_and_the_take_still_answers(
    sim: Sim, tmp_path: Path
) -> None:
    """ConsolidateVMDisks_Task fails (a lock): the clone is complete, so the take answers,
    and an alert names the VM whose disk keeps running on a redo log. A VM snapshot delete
    that leaves a delta is alerted the same way."""
    settings = replace(sim.settings, alert_log=tmp_path / "alerts.log")
    set_inventory(sim.port, leave_deltas=True, consolidate_fails=100)
    create_vm(sim.port, "cn02", [4 * MIB])
    driver = VmwareDriver(settings)
    primary = driver.take(volume=volume("cn02", "cn02"), snapshot_id=new_snapshot_id())
    assert primary.overlay in {v["name"] for v in list_vms(sim.port)}
    log = settings.alert_log.read_text()
    assert "VMWARE.CONSOLIDATION.NEEDED vm=cn02" in log and "FileLocked" in log
    ref = VmRef(name="cn02", host="vc1", hypervisor="vmware")
    op = VmSnapshotOperation(snapshot_id=new_snapshot_id(), vm=ref, type=VmSnapshotType.DISK)
    driver.take_vm_snapshot(op)
    driver.delete_vm_snapshot(op)
    assert settings.alert_log.read_text().count("VMWARE.CONSOLIDATION.NEEDED vm=cn02") == 2
    assert vm_state(sim.port, "cn02")["consolidation_needed"]


async def test_a_revert_refuses_a_disk_on_a_delta_and_writes_no_new_flat_file(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """A volume snapshot is backed up while consolidation keeps failing, so the VM stays on
    ``cv01-000001.vmdk``. The revert is refused, and nothing is written (no
    ``cv01-000001-flat.vmdk``, the base untouched). Once consolidation works, the revert
    consolidates first and writes the base disk, which then reads as the snapshot."""
    from snapferry.workflows.snapshot import REVERT_UPDATE

    size = 8 * MIB
    create_vm(vsphere.port, "cv01", [size])
    fill(vsphere, "cv01", size=size, seed=61)
    set_inventory(vsphere.port, leave_deltas=True, consolidate_fails=1000)
    folder = vsphere.root / "ds1" / "cv01"
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        answer = await starter.create_snapshot(
            client, vmware_request("cv01", "cv01", host_name, vsphere)
        )
        at_take = vsphere.disk("cv01").read_bytes()
        record = await starter.wait_settled(client, answer.id)
        assert record.backup is not None
        assert vm_state(vsphere.port, "cv01")["chains"] == [["cv01-000001.vmdk", "cv01.vmdk"]]
        guest_write(vsphere.port, "cv01", 0, b"\x5a" * MIB)  # after the snapshot
        power(vsphere, "cv01", False)
        after_write = vsphere.disk("cv01").read_bytes()
        with pytest.raises(starter.SnapferryClientError, match="still on the redo log"):
            await starter.snapshot_operation(client, answer.id, REVERT_UPDATE)
        assert not (folder / "cv01-000001-flat.vmdk").exists()
        assert vsphere.disk("cv01").read_bytes() == after_write  # nothing written
        set_inventory(vsphere.port, consolidate_fails=0)
        reverted = await starter.snapshot_operation(client, answer.id, REVERT_UPDATE)
        assert reverted.reverts == 1
    assert not (folder / "cv01-000001-flat.vmdk").exists()
    assert vm_state(vsphere.port, "cv01")["chains"] == [["cv01.vmdk"]]
    assert vsphere.disk("cv01").read_bytes() == at_take
