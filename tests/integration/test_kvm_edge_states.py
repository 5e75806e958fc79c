"""KVM domains in the states between running and stopped, and operations that must build
before they destroy: real libvirtd and QEMU, through :class:`KvmDriver`.

- A managed-save image (virDomainManagedSave) makes a domain neither running nor stopped:
  ``virsh start`` restores the guest from the image, with the definition saved *inside*
  it (libvirt's qemuDomainObjRestore), so a disk change made meanwhile would either be
  ignored or pull the guest's disk from under its saved RAM.
- A VM snapshot and a volume snapshot with one UUID are two snapshots.
- A revert that can fail does the failing part before it touches the VM.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from snapferry.activities.contracts import (
    RevertRequest,
    VmRef,
    VmSnapshotOperation,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import HypervisorUnavailable, ImageUnreadable, InvalidInput
from snapferry.activities.hypervisors.kvm import RELEASED_SUFFIX, KvmDriver
from snapferry.activities.hypervisors.kvm import revert as kvm_revert
from snapferry.activities.settings import Settings
from snapferry.workers.demo_vm import MIB, domain_xml

from .helpers import chain_of, disk_driver, disk_source, images_identical
from .test_kvm_chain_crashes import GuestDisk

pytestmark = pytest.mark.integration


def volume_of(vm_name: str, host: str) -> VolumeRef:
    return VolumeRef(vm=VmRef(name=vm_name, host=host), disk="vda")


# -- managed save ---------------------------------------------------------------------------
def test_a_managed_saved_vm_refuses_take_and_revert_and_keeps_its_disk(
    settings: Settings, make_vm, host_name: str, libvirt_conn, tmp_path: Path
) -> None:
    vm = make_vm(size=16 * MIB, data_bytes=2 * MIB)
    guest = GuestDisk(vm, tmp_path)
    driver = KvmDriver(settings)
    volume = volume_of(vm.name, host_name)
    sid = new_snapshot_id()
    snap = driver.take(volume=volume, snapshot_id=sid)
    guest.write(pattern=0x3C, offset=MIB, length=MIB)
    dom = libvirt_conn.lookupByName(vm.name)
    dom.managedSave(0)
    before = chain_of(disk_source(libvirt_conn, vm.name, inactive=True))
    with pytest.raises(InvalidInput, match="managed save"):
        driver.take(volume=volume, snapshot_id=new_snapshot_id())
    with pytest.raises(InvalidInput, match="managed save"):
        driver.revert(
            RevertRequest(snapshot_id=sid, volume=volume, primary=snap, manifest_path=None)
        )
    assert chain_of(disk_source(libvirt_conn, vm.name, inactive=True)) == before
    assert dom.hasManagedSaveImage(0)
    # A delete meanwhile merges nothing offline: the saved guest's disk is left as it was.
    driver.release(volume=volume, snapshot_id=sid, source=snap, backed_up=False)
    assert chain_of(disk_source(libvirt_conn, vm.name, inactive=True)) == before
    dom.create()  # virsh start: restores the saved guest
    assert dom.isActive() and not dom.hasManagedSaveImage(0)
    assert images_identical(guest.expected, disk_source(libvirt_conn, vm.name), fmt_b="qcow2")
    # Running again, the release merges live.
    driver.release(volume=volume, snapshot_id=sid, source=snap, backed_up=False)
    assert disk_source(libvirt_conn, vm.name) == str(vm.disk)
    assert images_identical(guest.expected, vm.disk, fmt_b="qcow2")


def test_a_vm_snapshot_of_a_managed_saved_vm_is_refused(
    settings: Settings, make_vm, host_name: str, libvirt_conn
) -> None:
    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    dom = libvirt_conn.lookupByName(vm.name)
    dom.managedSave(0)
    op = VmSnapshotOperation(
        snapshot_id=new_snapshot_id(), vm=VmRef(name=vm.name, host=host_name), type="Disk"
    )
    with pytest.raises(InvalidInput, match="managed save"):
        KvmDriver(settings).take_vm_snapshot(op)
    assert chain_of(disk_source(libvirt_conn, vm.name, inactive=True)) == [str(vm.disk)]


# -- one UUID, two kinds --------------------------------------------------------------------
def test_a_vm_snapshot_and_a_volume_snapshot_with_one_id_are_kept_apart(
    settings: Settings, make_vm, host_name: str, libvirt_conn, tmp_path: Path
) -> None:
    vm = make_vm(size=16 * MIB, data_bytes=2 * MIB)
    guest = GuestDisk(vm, tmp_path)
    driver = KvmDriver(settings)
    shared_id = new_snapshot_id()
    op = VmSnapshotOperation(
        snapshot_id=shared_id, vm=VmRef(name=vm.name, host=host_name), type="Disk"
    )
    taken = driver.take_vm_snapshot(op)
    at_vm_snapshot = tmp_path / "at-vm-snapshot.raw"
    at_vm_snapshot.write_bytes(guest.expected.read_bytes())
    guest.write(pattern=0x7E, offset=3 * MIB, length=MIB)
    snap = driver.take(volume=volume_of(vm.name, host_name), snapshot_id=shared_id)
    assert snap.overlay != taken.overlays["vda"]
    # The volume snapshot holds the disk as it is now, the VM snapshot as it was.
    assert images_identical(guest.expected, snap.image, fmt_b=snap.image_format)
    frozen_vm = chain_of(disk_source(libvirt_conn, vm.name))[2]
    assert images_identical(at_vm_snapshot, frozen_vm, fmt_b="qcow2")
    # Its backup done and a newer one after it, the VM snapshot is still there to revert to.
    driver.release(
        volume=volume_of(vm.name, host_name), snapshot_id=shared_id, source=snap, backed_up=True
    )
    libvirt_conn.lookupByName(vm.name).destroy()
    driver.revert_vm_snapshot(op.model_copy(update={"taken": taken}))
    assert images_identical(at_vm_snapshot, disk_source(libvirt_conn, vm.name), fmt_b="qcow2")


# -- reverts that build first ---------------------------------------------------------------
def test_a_raw_disk_revert_that_fails_to_redefine_leaves_the_disk_raw_and_whole(
    settings: Settings, libvirt_conn, host_name: str, tmp_path: Path, monkeypatch
) -> None:
    """A raw disk reverted into a qcow2 layer: the definition is what fails (libvirtd
    restarting); the file libvirt defines as raw must still be the raw disk."""
    primary = tmp_path / "primary"
    primary.mkdir()
    disk = primary / "raw01-vda.img"
    original = bytes(range(256)) * (4 * MIB // 256)
    disk.write_bytes(original)
    other = tmp_path / "other.raw"
    other.write_bytes(b"\x42" * (4 * MIB))
    name = f"sf-test-raw-{new_snapshot_id()[:8]}"
    dom = libvirt_conn.defineXML(domain_xml(name, disk, disk_format="raw"))
    try:
        driver = KvmDriver(settings)

        def libvirt_down(*_a: object, **_k: object) -> None:
            raise HypervisorUnavailable("injected: libvirtd is restarting")

        monkeypatch.setattr(KvmDriver, "_redefine_disk", libvirt_down)
        with pytest.raises(HypervisorUnavailable):
            driver._revert_disk(dom, name, "vda", "t1", source=str(other), source_fmt="raw")
        monkeypatch.undo()
        source, fmt = disk_driver(libvirt_conn, name)
        assert fmt == "raw"
        assert Path(source).read_bytes() == original
        # The retry then reverts it for real, and the definition names a qcow2 file.
        driver._revert_disk(dom, name, "vda", "t1", source=str(other), source_fmt="raw")
        source, fmt = disk_driver(libvirt_conn, name)
        assert fmt == "qcow2"
        assert images_identical(other, source, fmt_b="qcow2")
        assert not disk.exists()  # the raw file it replaced is gone
    finally:
        dom.undefine()


def _vm_snapshot_then_volume_snapshot(
    driver: KvmDriver, vm_name: str, host: str
) -> VmSnapshotOperation:
    """A DiskAndMemory VM snapshot with a volume snapshot above it, so that reverting to
    it needs a full copy of its frozen image (it is not the newest)."""
    op = VmSnapshotOperation(
        snapshot_id=new_snapshot_id(), vm=VmRef(name=vm_name, host=host), type="DiskAndMemory"
    )
    taken = driver.take_vm_snapshot(op)
    driver.take(volume=volume_of(vm_name, host), snapshot_id=new_snapshot_id())
    return op.model_copy(update={"taken": taken})


def test_a_disk_and_memory_revert_that_fails_leaves_the_vm_running(
    settings: Settings, make_vm, host_name: str, libvirt_conn, monkeypatch
) -> None:
    vm = make_vm(size=16 * MIB, data_bytes=2 * MIB)
    driver = KvmDriver(settings)
    op = _vm_snapshot_then_volume_snapshot(driver, vm.name, host_name)
    before = chain_of(disk_source(libvirt_conn, vm.name))
    real = kvm_revert.run_qemu_img

    def convert_fails(*args: str) -> str:
        if args[0] == "convert":
            raise ImageUnreadable("injected: primary storage full")
        return real(*args)

    monkeypatch.setattr(kvm_revert, "run_qemu_img", convert_fails)
    with pytest.raises(ImageUnreadable):
        driver.revert_vm_snapshot(op)
    dom = libvirt_conn.lookupByName(vm.name)
    assert dom.isActive()
    assert chain_of(disk_source(libvirt_conn, vm.name)) == before
    assert not list(vm.disk.parent.glob("*.partial"))


def test_a_disk_and_memory_revert_of_a_transient_domain_keeps_the_domain(
    settings: Settings, make_vm, host_name: str, libvirt_conn, tmp_path: Path
) -> None:
    """CloudStack's agent runs transient domains: destroy() removes them from libvirt."""
    vm = make_vm(size=16 * MIB, data_bytes=2 * MIB)
    guest = GuestDisk(vm, tmp_path)
    dom = libvirt_conn.lookupByName(vm.name)
    dom.undefine()  # still running, now transient
    assert not dom.isPersistent()
    driver = KvmDriver(settings)
    at_snapshot = tmp_path / "at-snapshot.raw"
    at_snapshot.write_bytes(guest.expected.read_bytes())
    op = _vm_snapshot_then_volume_snapshot(driver, vm.name, host_name)
    guest.write(pattern=0x19, offset=0, length=MIB)
    driver.revert_vm_snapshot(op)
    dom = libvirt_conn.lookupByName(vm.name)
    assert dom.isActive()
    assert images_identical(at_snapshot, disk_source(libvirt_conn, vm.name), fmt_b="qcow2")


def test_a_vm_snapshot_delete_after_the_domain_vanished_finishes(
    settings: Settings, make_vm, host_name: str, libvirt_conn
) -> None:
    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    driver = KvmDriver(settings)
    op = VmSnapshotOperation(
        snapshot_id=new_snapshot_id(), vm=VmRef(name=vm.name, host=host_name), type="DiskAndMemory"
    )
    taken = driver.take_vm_snapshot(op)
    assert taken.memory and Path(taken.memory).exists()
    dom = libvirt_conn.lookupByName(vm.name)
    dom.destroy()
    dom.undefine()
    driver.delete_vm_snapshot(op.model_copy(update={"taken": taken}))
    assert not Path(taken.memory).exists()
    # Its layers stay (the disk files may be defined again) but are marked released, so a
    # release on a domain defined on them again merges them.
    overlay = taken.overlays["vda"]
    assert Path(overlay + RELEASED_SUFFIX).exists()
    subprocess.run(["qemu-img", "info", "-f", "qcow2", overlay], check=True, capture_output=True)


@pytest.mark.parametrize("running", [True, False], ids=["live", "offline"])
def test_a_revert_to_before_a_resize_keeps_the_snapshots_size_through_every_merge(
    settings: Settings, make_vm, host_name: str, libvirt_conn, running: bool
) -> None:
    """A disk grown after snapshot s1 and written past s1's end, then reverted to s1: it
    has s1's size and bytes, and merging the layers below it must not grow it back (QEMU's
    commit only grows a base) and show the tail written before the revert."""
    from snapferry.activities.storage.reader import image_info

    vm = make_vm(size=16 * MIB, data_bytes=2 * MIB, start=False)
    driver = KvmDriver(settings)
    volume = volume_of(vm.name, host_name)
    sid1 = new_snapshot_id()
    s1 = driver.take(volume=volume, snapshot_id=sid1)
    assert s1.overlay
    grown = disk_source(libvirt_conn, vm.name, inactive=True)
    subprocess.run(["qemu-img", "resize", "-q", "-f", "qcow2", grown, str(32 * MIB)], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x77 {20 * MIB} {MIB}", grown], check=True
    )
    sid2 = new_snapshot_id()
    s2 = driver.take(volume=volume, snapshot_id=sid2)
    driver.revert(RevertRequest(snapshot_id=sid1, volume=volume, primary=s1, manifest_path=None))
    dom = libvirt_conn.lookupByName(vm.name)
    if running:
        dom.create()

    def size_and_bytes_are_s1s() -> None:
        active = disk_source(libvirt_conn, vm.name)
        size = (
            dom.blockInfo("vda", 0)[0] if running else image_info(active, "qcow2")["virtual-size"]
        )
        assert size == 16 * MIB
        assert images_identical(vm.reference, active, fmt_b="qcow2")

    size_and_bytes_are_s1s()
    driver.release(volume=volume, snapshot_id=sid2, source=s2, backed_up=False)
    size_and_bytes_are_s1s()
    driver.release(volume=volume, snapshot_id=sid1, source=s1, backed_up=False)
    assert disk_source(libvirt_conn, vm.name) == str(vm.disk)
    size_and_bytes_are_s1s()
    if running:
        dom.destroy()
    dom.create()  # and after a restart, the guest sees s1's size
    assert dom.blockInfo("vda", 0)[0] == 16 * MIB


def test_a_failed_volume_take_is_discarded_without_the_vm_snapshot_of_that_id(
    settings: Settings, make_vm, host_name: str, libvirt_conn, tmp_path: Path
) -> None:
    from snapferry.activities.contracts import DiscardRequest

    vm = make_vm(size=16 * MIB, data_bytes=2 * MIB)
    driver = KvmDriver(settings)
    shared_id = new_snapshot_id()
    ref = VmRef(name=vm.name, host=host_name)
    taken = driver.take_vm_snapshot(
        VmSnapshotOperation(snapshot_id=shared_id, vm=ref, type="DiskAndMemory")
    )
    assert taken.memory
    vm.guest_write(pattern=0x7E, offset=3 * MIB, length=MIB)
    # The volume snapshot with that ID failed to take; its workflow discards its leftovers.
    driver.discard(DiscardRequest(snapshot_id=shared_id, vm=ref, vm_snapshot=False))
    assert taken.overlays["vda"] in chain_of(disk_source(libvirt_conn, vm.name))
    assert Path(taken.memory).exists()
    assert not Path(taken.overlays["vda"] + RELEASED_SUFFIX).exists()
