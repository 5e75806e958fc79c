"""Takes the driver must refuse before the answer, against tests/vsphere_sim, through its own
calls: encrypted VMs, independent disks and backings other than flat (nothing is made);
and vCenter faults no retry can cure (a missing privilege, a full datastore), which are
permanent and say what to fix."""

from __future__ import annotations

import pytest

from snapferry.activities.contracts import DiscardRequest, HypervisorType, VmRef, new_snapshot_id
from snapferry.activities.errors import PermissionDenied, PrimaryStoreFull, UnsupportedImage
from snapferry.activities.hypervisors.vmware import VmwareDriver
from tests.vsphere_sim.control import create_vm, list_vms, set_inventory, soap_calls

from .test_vmware_clones import datastore_entries, volume
from .test_vmware_disk_copy import MIB, Sim, sim

__all__ = ["sim"]

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("kind", "refusal"),
    [
        ({"encrypted": True}, "is encrypted"),
        ({"disk_mode": "independent_persistent"}, "independent_persistent"),
        ({"disk_mode": "independent_nonpersistent"}, "independent_nonpersistent"),
        ({"backing": "rdm"}, "RawDiskMappingVer1BackingInfo backing"),
        ({"backing": "sesparse"}, "SeSparseBackingInfo backing"),
    ],
)
def test_a_disk_no_backup_could_read_is_refused_before_anything_is_made(
    sim: Sim, kind: dict, refusal: str
) -> None:
    create_vm(sim.port, "rf01", [4 * MIB], **kind)
    with pytest.raises(UnsupportedImage, match=refusal) as caught:
        VmwareDriver(sim.settings).take(
            volume=volume("rf01", "rf01"), snapshot_id=new_snapshot_id()
        )
    assert caught.value.non_retryable and "nothing was taken" in str(caught.value)
    calls = soap_calls(sim.port)
    assert "CreateSnapshot_Task" not in calls and "CloneVM_Task" not in calls
    assert [v["name"] for v in list_vms(sim.port)] == ["rf01"]


def test_a_missing_privilege_is_permanent_and_named(sim: Sim) -> None:
    """vCenter refuses the clone with NoPermission: the take fails for good (no five
    futile attempts) naming the privilege, and the discard leaves nothing."""
    create_vm(sim.port, "rf02", [4 * MIB])
    set_inventory(sim.port, clone_fault="NoPermission")
    driver = VmwareDriver(sim.settings)
    sid = new_snapshot_id()
    with pytest.raises(PermissionDenied, match="VirtualMachine.Provisioning.Clone") as caught:
        driver.take(volume=volume("rf02", "rf02"), snapshot_id=sid)
    assert caught.value.non_retryable
    ref = VmRef(name="rf02", host="vc1", hypervisor=HypervisorType.VMWARE)
    driver.discard(DiscardRequest(vm=ref, snapshot_id=sid))
    assert [v["name"] for v in list_vms(sim.port)] == ["rf02"]
    assert list_vms(sim.port)[0]["snapshots"] == [] and datastore_entries(sim, sid) == []


def test_a_full_datastore_is_permanent_and_named(sim: Sim) -> None:
    """The clone task fails with NoDiskSpace: a permanent error naming the datastore,
    instead of a retry that copies the disk again."""
    create_vm(sim.port, "rf03", [4 * MIB])
    set_inventory(sim.port, clone_fault="NoDiskSpace")
    with pytest.raises(PrimaryStoreFull, match="datastore ds1") as caught:
        VmwareDriver(sim.settings).take(
            volume=volume("rf03", "rf03"), snapshot_id=new_snapshot_id()
        )
    assert caught.value.non_retryable
