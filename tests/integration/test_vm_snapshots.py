"""VM snapshots on real libvirtd/QEMU, through the real CLI: create (Disk and DiskAndMemory),
list, revert, delete, with CloudStack's VMSnapshot states and every bad-input case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.settings import Settings
from snapferry.workers.demo_vm import MIB

from ..conftest import snapferry_cli
from .helpers import images_identical, patch_reference

pytestmark = pytest.mark.integration


def active_image(dom) -> str:  # type: ignore[no-untyped-def]
    return dom.XMLDesc(0).split("<source file='")[1].split("'")[0]


def layer_files(disk: Path) -> list[str]:
    """The disk's layers, memory files and release markers (not the .vm/.base markers)."""
    markers = (".vm", ".base")
    return sorted(
        p.name for p in disk.parent.glob(disk.name + ".*") if not p.name.endswith(markers)
    )


async def cli_json(*args: str) -> dict:
    proc = await snapferry_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


async def test_vm_snapshot_create_list_revert_delete(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    host_name: str,
    libvirt_conn,
    tmp_path: Path,
) -> None:
    vm = make_vm(size=16 * MIB, data_bytes=4 * MIB)
    dom = libvirt_conn.lookupByName(vm.name)
    at_disk = shutil.copyfile(vm.reference, tmp_path / "at_disk.raw")
    create = ("vm-snapshot", "create", "--vm", vm.name, "--host", host_name)

    disk_snap = await cli_json(*create, "--type", "Disk", "--name", "before-upgrade")
    assert disk_snap["state"] == "Ready" and disk_snap["type"] == "Disk"
    assert [t["state"] for t in disk_snap["transitions"]] == ["Allocated", "Creating", "Ready"]
    vm.guest_write(pattern=0x11, offset=0, length=MIB)
    at_mem = patch_reference(at_disk, tmp_path / "at_mem.raw", pattern=0x11, offset=0, length=MIB)
    mem_snap = await cli_json(*create, "--type", "DiskAndMemory")
    assert mem_snap["state"] == "Ready" and Path(mem_snap["taken"]["memory"]).is_file()
    vm.guest_write(pattern=0x22, offset=2 * MIB, length=MIB)
    now = patch_reference(at_mem, tmp_path / "now.raw", pattern=0x22, offset=2 * MIB, length=MIB)

    listed = json.loads(
        (await snapferry_cli("vm-snapshot", "list", "--vm", vm.name, "--json")).stdout
    )
    assert {r["id"] for r in listed} == {disk_snap["id"], mem_snap["id"]}
    assert {r["state"] for r in listed} == {"Ready"}
    bad_state = await snapferry_cli("vm-snapshot", "list", "--state", "BackedUp")
    assert bad_state.returncode == 2 and "invalid choice" in bad_state.stderr

    # A Disk revert is refused while the VM runs, and changes nothing.
    refused = await snapferry_cli("vm-snapshot", "revert", disk_snap["id"])
    assert refused.returncode == 1 and "is running; stop it" in refused.stderr
    assert dom.isActive() and images_identical(now, active_image(dom), fmt_b="qcow2")

    # A DiskAndMemory revert resumes the VM from its memory, on the snapshot's disk content.
    reverted = await cli_json("vm-snapshot", "revert", mem_snap["id"])
    assert reverted["state"] == "Ready" and reverted["reverts"] == 1
    assert [t["state"] for t in reverted["transitions"]][-2:] == ["Reverting", "Ready"]
    assert dom.isActive() and images_identical(at_mem, active_image(dom), fmt_b="qcow2")
    vm.guest_write(pattern=0x33, offset=3 * MIB, length=MIB)  # the resumed guest can write

    # A Disk revert of the stopped VM; the VM stays stopped, then starts on the content.
    dom.destroy()
    await cli_json("vm-snapshot", "revert", disk_snap["id"])
    assert not dom.isActive() and images_identical(at_disk, active_image(dom), fmt_b="qcow2")
    before = layer_files(vm.disk)
    no_memory = await snapferry_cli(*create, "--type", "DiskAndMemory")
    assert no_memory.returncode == 1 and "needs a running VM" in no_memory.stderr
    assert layer_files(vm.disk) == before  # nothing was created
    dom.create()

    # Delete: Removed, the memory file gone, and with nothing else held the VM is back on
    # its original image, whose content is what it was reverted to.
    for snap in (mem_snap, disk_snap):
        gone = await cli_json("vm-snapshot", "delete", snap["id"])
        assert gone["state"] == "Removed"
        assert [t["state"] for t in gone["transitions"]][-2:] == ["Expunging", "Removed"]
    assert not Path(mem_snap["taken"]["memory"]).exists()
    assert active_image(dom) == str(vm.disk) and layer_files(vm.disk) == []
    assert images_identical(at_disk, vm.disk, fmt_b="qcow2")
    again = await snapferry_cli("vm-snapshot", "delete", disk_snap["id"])
    assert again.returncode == 1 and "Removed" in again.stderr
    revert_removed = await snapferry_cli("vm-snapshot", "revert", disk_snap["id"])
    assert revert_removed.returncode == 1 and "Removed" in revert_removed.stderr
    shown = await cli_json("vm-snapshot", "show", mem_snap["id"])
    assert shown["state"] == "Removed"


async def test_vm_snapshot_bad_input(
    client: Client, settings: Settings, workers: None, host_name: str
) -> None:
    unknown = await snapferry_cli("vm-snapshot", "create", "--vm", "nosuchvm", "--host", host_name)
    assert unknown.returncode == 1 and "'nosuchvm' does not exist" in unknown.stderr
    for bad in ("../etc", "-rf", ""):
        proc = await snapferry_cli("vm-snapshot", "create", "--vm", bad, "--host", host_name)
        assert proc.returncode in (1, 2) and (
            "not a valid name" in proc.stderr or "expected one argument" in proc.stderr
        ), proc.stderr
    wrong_type = await snapferry_cli("vm-snapshot", "create", "--vm", "x", "--type", "Memory")
    assert wrong_type.returncode == 2 and "invalid choice" in wrong_type.stderr
    not_an_id = await snapferry_cli("vm-snapshot", "revert", "abc")
    assert not_an_id.returncode == 1 and "not a snapshot ID" in not_an_id.stderr
    missing = await snapferry_cli("vm-snapshot", "delete", "0f0e0d0c-0b0a-4909-8807-060504030201")
    assert missing.returncode == 1 and "no VM snapshot with ID" in missing.stderr


def test_discard_removes_what_a_failed_take_left(
    settings: Settings, make_vm, host_name: str, libvirt_conn, tmp_path: Path
) -> None:
    """A take that made its overlay but then failed on every retry leaves it behind; the
    workflow's discard step (driven here directly) finds it by the snapshot ID and merges it,
    for both kinds, and is a no-op the second time or for a take that made nothing."""
    from snapferry.activities.contracts import (
        DiscardRequest,
        VmRef,
        VmSnapshotOperation,
        VmSnapshotType,
        VolumeRef,
        new_snapshot_id,
    )
    from snapferry.activities.hypervisors.kvm import KvmDriver

    vm = make_vm(size=16 * MIB, data_bytes=4 * MIB)
    dom = libvirt_conn.lookupByName(vm.name)
    ref = VmRef(name=vm.name, host=host_name)
    driver = KvmDriver(settings)
    volume_sid, vm_sid = new_snapshot_id(), new_snapshot_id()
    driver.take(volume=VolumeRef(vm=ref, disk="vda"), snapshot_id=volume_sid)
    vm.guest_write(pattern=0x5A, offset=MIB, length=MIB)
    taken = driver.take_vm_snapshot(
        VmSnapshotOperation(snapshot_id=vm_sid, vm=ref, type=VmSnapshotType.DISK_AND_MEMORY)
    )
    assert taken.memory and Path(taken.memory).exists() and len(layer_files(vm.disk)) == 3
    for sid in (vm_sid, volume_sid, vm_sid, new_snapshot_id()):
        driver.discard(DiscardRequest(snapshot_id=sid, vm=ref))
    assert active_image(dom) == str(vm.disk) and layer_files(vm.disk) == []
    expected = patch_reference(
        vm.reference, tmp_path / "now.raw", pattern=0x5A, offset=MIB, length=MIB
    )
    assert images_identical(expected, vm.disk, fmt_b="qcow2")  # the guest's write is kept


def test_a_release_never_touches_another_disk_in_the_same_pool(
    settings: Settings, make_vm, host_name: str, libvirt_conn
) -> None:
    """Two VMs' disks share a pool directory. A released layer of VM A that its newer
    snapshot still needs survives a release on VM B: the clean-up of merged leftovers looks
    only at the released disk's own layers, not at every disk in the directory."""
    from snapferry.activities.contracts import VmRef, VolumeRef, new_snapshot_id
    from snapferry.activities.hypervisors.kvm import KvmDriver

    from .helpers import chain_of

    a, b = make_vm(size=8 * MIB, data_bytes=MIB), make_vm(size=8 * MIB, data_bytes=MIB)
    assert a.disk.parent == b.disk.parent
    driver = KvmDriver(settings)
    vol_a = VolumeRef(vm=VmRef(name=a.name, host=host_name), disk="vda")
    vol_b = VolumeRef(vm=VmRef(name=b.name, host=host_name), disk="vda")
    s1, s2, sb = new_snapshot_id(), new_snapshot_id(), new_snapshot_id()
    first = driver.take(volume=vol_a, snapshot_id=s1)
    driver.take(volume=vol_a, snapshot_id=s2)
    driver.release(volume=vol_a, snapshot_id=s1, source=first)  # held: s2 sits on top
    on_b = driver.take(volume=vol_b, snapshot_id=sb)
    driver.release(volume=vol_b, snapshot_id=sb, source=on_b)
    chain_a = chain_of(active_image(libvirt_conn.lookupByName(a.name)))
    assert len(chain_a) == 3 and all(Path(layer).exists() for layer in chain_a)
    assert images_identical(a.reference, chain_a[0], fmt_b="qcow2")
