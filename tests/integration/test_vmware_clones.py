"""The take's clone against tests/vsphere_sim, through the driver's own calls (no Temporal):
its name within vCenter's 80 characters however the VM is called or addressed, one
CloneVM_Task per take whatever attempt dies when, and nothing of it left on the datastore
after its release (files of disks it removed, the orphan of an interrupted clone, a clone
whose VM moved to another folder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect

from snapferry.activities.contracts import (
    BackupPlan,
    DiscardRequest,
    HypervisorType,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import HypervisorUnavailable
from snapferry.activities.hypervisors.vmware import VmwareDriver
from tests.simulator import REPO_ROOT
from tests.vsphere_sim.control import (
    create_vm,
    list_tasks,
    list_vms,
    set_inventory,
    set_task_delay,
    soap_calls,
)
from tests.vsphere_sim.inventory import MAX_NAME, escaped_length

from .test_vmware_disk_copy import MIB, PASSWORD, USER, Sim, fill, read_all, sim

__all__ = ["sim"]  # the fixture, shared with test_vmware_disk_copy

pytestmark = pytest.mark.integration


def volume(vm: str, disk: str) -> VolumeRef:
    return VolumeRef(vm=VmRef(name=vm, host="vc1", hypervisor=HypervisorType.VMWARE), disk=disk)


def connect(sim: Sim) -> Any:
    return SmartConnect(protocol="http", host="127.0.0.1", port=sim.port, user=USER, pwd=PASSWORD)


def datastore_entries(sim: Sim, snapshot_id: str) -> list[str]:
    """Everything on ds1 whose name carries the snapshot's id (the clone's folders)."""
    return sorted(p.name for p in (sim.root / "ds1").iterdir() if snapshot_id in p.name)


def wait_task(task: Any) -> Any:
    while task.info.state not in ("success", "error"):
        time.sleep(0.05)
    assert task.info.state == "success", task.info.error
    return task.info.result


# -- names ---------------------------------------------------------------------------------


def test_clone_names_fit_80_characters_by_long_name_moref_and_uuid(sim: Sim) -> None:
    """A VM named with 65 characters, and one addressed by moref and by instance UUID (the
    typed identifier is 36 characters): each take's clone name fits vCenter's 80
    characters, and the record keeps the clone's moref."""
    long_name = "payments-ledger-primary-database-eu-west-1-production-cluster-a01"
    assert len(long_name) == 65
    moid = create_vm(sim.port, long_name, [4 * MIB])
    data = fill(sim, long_name, 0, 4 * MIB, seed=51)
    driver = VmwareDriver(sim.settings)
    vm = sim.vm(long_name)
    for typed in (long_name, moid, vm["instance_uuid"]):
        sid = new_snapshot_id()
        primary = driver.take(volume=volume(typed, long_name), snapshot_id=sid)
        clone = next(v for v in list_vms(sim.port) if v["name"] == primary.overlay)
        assert escaped_length(clone["name"]) <= MAX_NAME and sid in clone["name"]
        assert primary.handle == clone["moid"]
        reader = driver.open_reader(primary, BackupPlan())
        assert read_all(reader, 4 * MIB) == data
        reader.close()
        driver.release(volume=volume(typed, long_name), snapshot_id=sid, source=primary)
        assert {v["name"] for v in list_vms(sim.port)} == {long_name}
        assert datastore_entries(sim, sid) == []


# -- one clone per take --------------------------------------------------------------------

_TAKE = """
import json, sys
from dataclasses import replace
from snapferry.activities.contracts import HypervisorType, VmRef, VolumeRef
from snapferry.activities.hypervisors.vmware import VmwareDriver
from snapferry.activities.settings import Settings, VcenterConfig
a = json.loads(sys.argv[1])
settings = replace(Settings.from_env(), vcenter=VcenterConfig(**a["vcenter"]))
ref = VmRef(name=a["vm"], host="vc1", hypervisor=HypervisorType.VMWARE)
VmwareDriver(settings).take(volume=VolumeRef(vm=ref, disk=a["vm"]), snapshot_id=a["sid"])
"""


def take_in_a_process(sim: Sim, vm: str, sid: str) -> subprocess.Popen[bytes]:
    """A take in a worker process of its own, to be killed with SIGKILL mid-way."""
    vc = sim.settings.vcenter
    assert vc is not None
    arg = {
        "vm": vm,
        "sid": sid,
        "vcenter": {
            "url": vc.url,
            "user": vc.user,
            "password_file": vc.password_file,
            "verify_tls": False,
            "datacenter": vc.datacenter,
        },
    }
    return subprocess.Popen(
        [sys.executable, "-c", _TAKE, json.dumps(arg)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.mark.parametrize(
    "dies_during", ["CreateSnapshot_Task", "CloneVM_Task", "RemoveSnapshot_Task"]
)
def test_one_clone_per_take_whatever_attempt_dies_when(sim: Sim, dies_during: str) -> None:
    """The first attempt's worker is killed (SIGKILL) while vCenter runs its snapshot, its
    clone or its snapshot removal; the task goes on in vCenter. vCenter registers the clone
    when its copy is done. The retried take makes no second snapshot and no second clone,
    leaves no temporary snapshot, and its clone holds the disk as it was."""
    set_inventory(sim.port, clone_listed="end")
    create_vm(sim.port, "ot01", [8 * MIB])
    data = fill(sim, "ot01", 0, 8 * MIB, seed=52)
    set_task_delay(sim.port, 3.0, dies_during)
    sid = new_snapshot_id()
    first = take_in_a_process(sim, "ot01", sid)
    description = {
        "CreateSnapshot_Task": "VirtualMachine.createSnapshot",
        "CloneVM_Task": "VirtualMachine.clone",
        "RemoveSnapshot_Task": "vm.Snapshot.remove",
    }[dies_during]
    try:
        for _ in range(200):
            tasks = list_tasks(sim.port)
            if any(t["descriptionId"] == description for t in tasks) or first.poll() is not None:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first attempt ended before it was killed"
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.wait()
    primary = VmwareDriver(sim.settings).take(volume=volume("ot01", "ot01"), snapshot_id=sid)
    calls = soap_calls(sim.port)
    assert calls.get("CloneVM_Task") == 1, calls
    assert calls.get("CreateSnapshot_Task") == 1, calls
    vms = {v["name"]: v for v in list_vms(sim.port)}
    # At most the take's own snapshot, which it keeps for Changed Block Tracking when CBT
    # was on before it (the first attempt turned it on), until release.
    assert set(vms) == {"ot01", primary.overlay}
    assert vms["ot01"]["snapshots"] in ([], [f"snapferry-{sid}"])
    reader = VmwareDriver(sim.settings).open_reader(primary, BackupPlan())
    assert read_all(reader, 4 * MIB) == data
    reader.close()
    VmwareDriver(sim.settings).release(
        volume=volume("ot01", "ot01"), snapshot_id=sid, source=primary
    )
    assert next(v for v in list_vms(sim.port) if v["name"] == "ot01")["snapshots"] == []


# -- leaks ---------------------------------------------------------------------------------


def test_release_leaves_no_file_when_the_clone_copied_the_removed_disks(sim: Sim) -> None:
    """A vCenter that copies the disks a clone removes and only detaches them (govmomi's
    reading): Destroy_Task leaves those files and their folder (apache/cloudstack#5333).
    The release removes the clone's folder after Destroy_Task."""
    set_inventory(sim.port, clone_copies_removed_disks=True)
    create_vm(sim.port, "lk01", [4 * MIB, 6 * MIB])
    driver = VmwareDriver(sim.settings)
    sid = new_snapshot_id()
    primary = driver.take(volume=volume("lk01", "lk01_1"), snapshot_id=sid)
    folder = sim.root / "ds1" / sim.vm(primary.overlay)["dir"]
    assert any("detached" in p.name for p in folder.iterdir())  # the copied, removed disk
    driver.release(volume=volume("lk01", "lk01_1"), snapshot_id=sid, source=primary)
    assert {v["name"] for v in list_vms(sim.port)} == {"lk01"}
    assert datastore_entries(sim, sid) == []


def test_an_interrupted_clone_leaves_no_orphan_folder(sim: Sim) -> None:
    """vpxd restarts mid-clone: the clone task fails, the clone is not registered and its
    folder stays on the datastore; vCenter would give the next clone ``<name>_1``. The
    retried take removes the orphan first, and the release leaves nothing of either."""
    create_vm(sim.port, "or01", [4 * MIB])
    data = fill(sim, "or01", 0, 4 * MIB, seed=53)
    set_inventory(sim.port, interrupt_clones=1)
    driver = VmwareDriver(sim.settings)
    sid = new_snapshot_id()
    with pytest.raises(HypervisorUnavailable, match="SystemError"):
        driver.take(volume=volume("or01", "or01"), snapshot_id=sid)
    assert len(datastore_entries(sim, sid)) == 1  # the orphan
    primary = driver.take(volume=volume("or01", "or01"), snapshot_id=sid)
    assert sim.vm(primary.overlay)["dir"] == primary.overlay  # not <name>_1
    reader = driver.open_reader(primary, BackupPlan())
    assert read_all(reader, 4 * MIB) == data
    reader.close()
    driver.release(volume=volume("or01", "or01"), snapshot_id=sid, source=primary)
    assert datastore_entries(sim, sid) == []


def test_a_failed_take_discard_removes_the_orphan_folder(sim: Sim) -> None:
    """A take whose clone was interrupted and that then failed for good: the discard
    removes the temporary snapshot and the orphan's folder."""
    create_vm(sim.port, "or02", [4 * MIB])
    set_inventory(sim.port, interrupt_clones=1)
    driver = VmwareDriver(sim.settings)
    sid = new_snapshot_id()
    with pytest.raises(HypervisorUnavailable):
        driver.take(volume=volume("or02", "or02"), snapshot_id=sid)
    ref = VmRef(name="or02", host="vc1", hypervisor=HypervisorType.VMWARE)
    driver.discard(DiscardRequest(vm=ref, snapshot_id=sid))
    assert sim.vm("or02")["snapshots"] == [] and datastore_entries(sim, sid) == []


def test_release_finds_the_clone_by_moref_after_the_vm_moved(sim: Sim) -> None:
    """The VM is moved to another folder between the answer and the release; its clone
    stays where it was made. The release finds it by the moref the record keeps."""
    create_vm(sim.port, "mv01", [4 * MIB])
    create_vm(sim.port, "elsewhere01", [512], folder="archive")
    driver = VmwareDriver(sim.settings)
    sid = new_snapshot_id()
    primary = driver.take(volume=volume("mv01", "mv01"), snapshot_id=sid)
    si = connect(sim)
    index = si.RetrieveContent().searchIndex
    target = index.FindByInventoryPath("dc1/vm/archive")
    wait_task(target.MoveIntoFolder_Task([index.FindByInventoryPath("dc1/vm/mv01")]))
    assert index.FindByInventoryPath("dc1/vm/archive/mv01") is not None
    Disconnect(si)
    driver.release(volume=volume("mv01", "mv01"), snapshot_id=sid, source=primary)
    assert {v["name"] for v in list_vms(sim.port)} == {"mv01", "elsewhere01"}
    assert datastore_entries(sim, sid) == []
