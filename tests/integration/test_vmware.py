"""VMware through the real pyvmomi against tests/vsphere_sim (a separate process that speaks
SOAP and the datastore HTTP protocol, and keeps disk bytes): full-clone takes, ranged
exports into the copy engine, VM snapshots, failures, credentials."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

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
from tests.vsphere_sim.control import create_vm, guest_write
from workers import starter
from workers.demo_vm import MIB
from workers.worker import running_workers

from ..conftest import Vsphere

pytestmark = pytest.mark.integration


def vmware_request(vm: str, disk: str, host: str, vsphere: Vsphere) -> SnapshotRequest:
    return SnapshotRequest(
        snapshot_id=new_snapshot_id(),
        volume=VolumeRef(vm=VmRef(name=vm, host=host, hypervisor=HypervisorType.VMWARE), disk=disk),
        backup=vsphere.settings.backup_defaults,
    )


def fill(vsphere: Vsphere, vm: str, *, size: int, seed: int) -> None:
    """Random guest data in the first half of disk 0, written by the 'guest'."""
    rng = random.Random(seed)
    for offset in range(0, size // 2, MIB):
        guest_write(vsphere.port, vm, offset, rng.randbytes(MIB))


def power(vsphere: Vsphere, vm: str, on: bool) -> None:
    si = vsphere.connect()
    target = si.RetrieveContent().searchIndex.FindByInventoryPath(f"dc1/vm/{vm}")
    task = target.PowerOnVM_Task() if on else target.PowerOffVM_Task()
    while task.info.state not in ("success", "error"):
        time.sleep(0.05)
    assert task.info.state == "success", task.info.error


async def test_split_snapshot_full_clone_backup_equals_the_disk_at_take(
    client: Client, vsphere: Vsphere, host_name: str, tmp_path: Path
) -> None:
    size = 32 * MIB
    create_vm(vsphere.port, "web01", [size, 8 * MIB])
    fill(vsphere, "web01", size=size, seed=1)
    slow = dataclasses.replace(vsphere.settings, backup_rate_limit_bps=16e6)
    async with running_workers(client, slow, hosts=[host_name], backup=True):
        answer = await starter.create_snapshot(
            client, vmware_request("web01", "web01", host_name, vsphere)
        )
        at_take = vsphere.disk("web01").read_bytes()  # the guest has not written since
        assert answer.state == SnapshotState.CREATED_ON_PRIMARY and answer.primary
        clone = answer.primary.overlay
        assert clone in vsphere.vm_names() and vsphere.snapshot_names("web01") == []
        guest_write(vsphere.port, "web01", 0, b"\xee" * MIB)  # after the take
        # The VM is free while its clone is backed up: off and on again.
        power(vsphere, "web01", False)
        power(vsphere, "web01", True)
        assert (await starter.get_record(client, answer.id)).state == SnapshotState.BACKING_UP
        record = await starter.wait_settled(client, answer.id)
    assert record.state == SnapshotState.BACKED_UP and record.backup and record.primary_released
    assert Path(record.backup.path).read_bytes() == at_take
    assert vsphere.disk("web01").read_bytes()[:MIB] == b"\xee" * MIB  # the VM kept its write
    assert clone not in vsphere.vm_names()  # the clone is destroyed after the backup
    assert vsphere.vm_names() == {"web01"}
