"""A disk chain that a dead host worker left mid-operation converges on the next release.

Real libvirtd and QEMU, driven through :class:`KvmDriver` directly: a killed worker leaves
libvirt's block job running (libvirt's docs for virDomainBlockCommit: the job belongs to
the domain, not to the client that started it), and whatever a later release plans must
come from the chain as that job leaves it. After every sequence:

- every layer a qcow2 header or a domain definition (live or persistent) names exists;
- the guest's view of its disk is exactly what it wrote;
- the VM starts again.
"""

from __future__ import annotations

import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from snapferry.activities.contracts import PrimarySnapshot, VmRef, VolumeRef, new_snapshot_id
from snapferry.activities.hypervisors.kvm import BASE_SUFFIX, RELEASED_SUFFIX, KvmDriver
from snapferry.activities.settings import Settings
from snapferry.workers.demo_vm import MIB, DemoVm

from .helpers import chain_of, disk_source, images_identical, patch_reference

pytestmark = pytest.mark.integration


class GuestDisk:
    """A test VM and the bytes its guest has written so far (a raw reference beside it)."""

    def __init__(self, vm: DemoVm, tmp_path: Path) -> None:
        assert vm.reference is not None
        self.vm = vm
        self.expected = tmp_path / f"{vm.name}.expected.raw"
        shutil.copyfile(vm.reference, self.expected)

    def write(self, *, pattern: int, offset: int, length: int) -> None:
        self.vm.guest_write(pattern=pattern, offset=offset, length=length)
        patch_reference(self.expected, self.expected, pattern=pattern, offset=offset, length=length)


def take(driver: KvmDriver, volume: VolumeRef) -> tuple[str, PrimarySnapshot]:
    sid = new_snapshot_id()
    return sid, driver.take(volume=volume, snapshot_id=sid)


def named_layers(dom: libvirt.virDomain) -> set[str]:
    """Every file the live and the persistent definitions of vda name (source and any
    recorded ``<backingStore>``)."""
    names: set[str] = set()
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        disk = ET.fromstring(dom.XMLDesc(flags)).find("./devices/disk")
        assert disk is not None
        for src in disk.iter("source"):
            if src.get("file"):
                names.add(src.get("file", ""))
    return names


def assert_converged(dom: libvirt.virDomain, guest: GuestDisk) -> None:
    for layer in named_layers(dom):
        assert Path(layer).exists(), f"{layer} is named by a definition but gone"
    active = disk_source(dom.connect(), dom.name())
    chain_of(active)  # every header's backing file exists (image_chain opens each)
    assert images_identical(guest.expected, active, fmt_b="qcow2")
    if dom.isActive():
        dom.destroy()
    dom.create()
    assert dom.isActive()
    active = disk_source(dom.connect(), dom.name())
    assert images_identical(guest.expected, active, fmt_b="qcow2")


def wait_ready(dom: libvirt.virDomain) -> None:
    for _ in range(1000):
        info = dom.blockJobInfo("vda", 0)
        if info and info["end"] > 0 and info["cur"] == info["end"]:
            return
        time.sleep(0.01)
    raise AssertionError("the active commit never became ready")


def test_a_release_waits_for_a_dead_workers_middle_commit_before_planning(
    settings: Settings, make_vm, host_name: str, libvirt_conn, tmp_path: Path
) -> None:
    """Chain [A(.base), R1(released), X(pending), Y]: a dead worker's commit of R1 into X
    still runs when X's snapshot is deleted. X holds R1's clusters once that job ends, so
    the release must plan from the chain the job leaves, and never delete X from a plan
    made while the job ran."""
    vm = make_vm(size=16 * MIB, data_bytes=4 * MIB)
    guest = GuestDisk(vm, tmp_path)
    driver = KvmDriver(settings)
    volume = VolumeRef(vm=VmRef(name=vm.name, host=host_name), disk="vda")
    sid_x, snap_x = take(driver, volume)  # X: a pending snapshot's overlay
    _, snap_r1 = take(driver, volume)
    guest.write(pattern=0x5A, offset=4 * MIB, length=6 * MIB)  # R1 holds 6 MiB
    _, snap_a = take(driver, volume)
    guest.write(pattern=0x6B, offset=MIB, length=MIB)
    assert snap_x.overlay and snap_r1.overlay and snap_a.overlay
    Path(snap_a.overlay + BASE_SUFFIX).touch()
    Path(snap_r1.overlay + RELEASED_SUFFIX).touch()
    dom = libvirt_conn.lookupByName(vm.name)
    # The dead worker's release of R1: a middle commit, slowed so that it outlives it.
    dom.blockCommit(
        "vda",
        snap_x.overlay,
        snap_r1.overlay,
        2 * MIB,
        libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES,
    )
    assert dom.blockJobInfo("vda", 0)
    driver.release(volume=volume, snapshot_id=sid_x, source=snap_x, backed_up=False)
    assert not dom.blockJobInfo("vda", 0)
    assert chain_of(disk_source(libvirt_conn, vm.name)) == [snap_a.overlay, str(vm.disk)]
    assert_converged(dom, guest)


def test_a_release_pivots_a_dead_workers_active_commit_of_released_layers(
    settings: Settings, make_vm, host_name: str, libvirt_conn, tmp_path: Path
) -> None:
    """Chain [O_N(released), O_B(.base), F]: a dead worker's active commit of O_N into O_B
    is left ready; then B is deleted, so the release plans [O_N, O_B] onto F. The job only
    commits released layers, so it is pivoted and the merge goes on: no ChainBusy for good."""
    vm = make_vm(size=16 * MIB, data_bytes=4 * MIB)
    guest = GuestDisk(vm, tmp_path)
    driver = KvmDriver(settings)
    volume = VolumeRef(vm=VmRef(name=vm.name, host=host_name), disk="vda")
    sid_b, snap_b = take(driver, volume)
    assert snap_b.overlay
    Path(snap_b.overlay + BASE_SUFFIX).touch()
    guest.write(pattern=0x11, offset=0, length=2 * MIB)
    _, snap_n = take(driver, volume)
    assert snap_n.overlay
    guest.write(pattern=0x22, offset=3 * MIB, length=2 * MIB)
    Path(snap_n.overlay + RELEASED_SUFFIX).touch()
    dom = libvirt_conn.lookupByName(vm.name)
    dom.blockCommit("vda", snap_b.overlay, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
    wait_ready(dom)  # the dead worker never pivoted
    driver.release(volume=volume, snapshot_id=sid_b, source=snap_b, backed_up=False)
    assert not dom.blockJobInfo("vda", 0)
    assert disk_source(libvirt_conn, vm.name) == str(vm.disk)
    assert not Path(snap_n.overlay).exists() and not Path(snap_b.overlay).exists()
    assert_converged(dom, guest)


def test_a_release_that_cannot_get_the_lock_leaves_its_layer_marked_for_the_next(
    settings: Settings, make_vm, host_name: str, libvirt_conn, tmp_path: Path
) -> None:
    """A delete whose release times out on the domain lock (a long revert holds it) still
    marks its layer released, so the next release on the disk merges it."""
    import fcntl
    import os
    from dataclasses import replace

    from snapferry.activities.errors import ChainBusy
    from snapferry.activities.hypervisors.domain_lock import lock_path

    vm = make_vm(size=16 * MIB, data_bytes=2 * MIB)
    guest = GuestDisk(vm, tmp_path)
    driver = KvmDriver(replace(settings, domain_lock_timeout_s=0.2))
    volume = VolumeRef(vm=VmRef(name=vm.name, host=host_name), disk="vda")
    sid_p, pending = take(driver, volume)
    guest.write(pattern=0x44, offset=0, length=MIB)
    sid_q, newer = take(driver, volume)
    assert pending.overlay and newer.overlay
    settings.lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(settings.lock_dir, vm.name), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ChainBusy):
            driver.release(volume=volume, snapshot_id=sid_p, source=pending, backed_up=False)
    finally:
        os.close(fd)
    assert Path(pending.overlay + RELEASED_SUFFIX).exists()
    driver.release(volume=volume, snapshot_id=sid_q, source=newer, backed_up=False)
    assert disk_source(libvirt_conn, vm.name) == str(vm.disk)
    assert_converged(libvirt_conn.lookupByName(vm.name), guest)


def offline_write(image: str, *, pattern: int, offset: int, length: int) -> None:
    """What a guest would write, on a stopped VM's active image."""
    import subprocess

    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", image],
        check=True,
        capture_output=True,
    )


class Killed(BaseException):
    """The host worker dies here (not an Exception: nothing in the driver may catch it)."""


@pytest.mark.parametrize("stopped_after", [True, False], ids=["then-stopped", "still-running"])
def test_a_vm_started_while_an_offline_merge_redefines_keeps_its_writes(
    settings: Settings,
    make_vm,
    host_name: str,
    libvirt_conn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stopped_after: bool,
) -> None:
    """An operator starts the VM between ``qemu-img commit`` and the redefinition onto the
    base, and the host worker dies right after that redefinition: the VM runs on the old
    top while its persistent definition names the base. Its writes land in the top only;
    the next operation must not lose them, whether the VM still runs or was stopped."""
    from snapferry.activities.hypervisors.kvm import merge

    vm = make_vm(size=16 * MIB, data_bytes=2 * MIB, start=False)
    guest = GuestDisk(vm, tmp_path)
    driver = KvmDriver(settings)
    volume = VolumeRef(vm=VmRef(name=vm.name, host=host_name), disk="vda")
    sid, snap = take(driver, volume)
    assert snap.overlay
    offline_write(snap.overlay, pattern=0x55, offset=MIB, length=MIB)
    patch_reference(guest.expected, guest.expected, pattern=0x55, offset=MIB, length=MIB)
    dom = libvirt_conn.lookupByName(vm.name)
    real_commit, real_redefine = merge.run_qemu_img, KvmDriver._redefine_disk

    def commit_then_operator_starts(*args: str) -> str:
        out = real_commit(*args)
        if args[0] == "commit":
            dom.create()
        return out

    def redefine_then_die(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_redefine(self, *args, **kwargs)
        raise Killed

    monkeypatch.setattr(merge, "run_qemu_img", commit_then_operator_starts)
    monkeypatch.setattr(KvmDriver, "_redefine_disk", redefine_then_die)
    with pytest.raises(Killed):
        driver.release(volume=volume, snapshot_id=sid, source=snap, backed_up=False)
    monkeypatch.undo()
    assert disk_source(libvirt_conn, vm.name) == snap.overlay  # running on the old top
    guest.write(pattern=0x66, offset=5 * MIB, length=MIB)
    if stopped_after:
        dom.destroy()
    # The retry (or any later operation on this VM) settles it.
    driver.release(volume=volume, snapshot_id=sid, source=snap, backed_up=False)
    assert_converged(dom, guest)


def write_as_guest(guest: GuestDisk, running: bool, *, pattern: int, offset: int) -> None:
    """One MiB written as the guest would: through the VM, or on its stopped active image."""
    if running:
        guest.write(pattern=pattern, offset=offset, length=MIB)
        return
    active = disk_source(guest.vm.conn, guest.vm.name)
    offline_write(active, pattern=pattern, offset=offset, length=MIB)
    patch_reference(guest.expected, guest.expected, pattern=pattern, offset=offset, length=MIB)


class StepKiller:
    """Kills the host worker right after its ``kill_at``-th step that changes a chain or a
    definition (a qemu-img write, a redefinition, a block job start or pivot, an unlink,
    the intent file): the step's effect is there, nothing after it ran. A live job the
    step started goes on in libvirt, as it does when the real worker dies."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kill_at: int) -> None:
        from snapferry.activities.hypervisors.kvm import intent, merge

        self.kill_at, self.steps = kill_at, 0

        def step(real):  # type: ignore[no-untyped-def]
            def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
                out = real(*args, **kwargs)
                self.steps += 1
                if self.steps == self.kill_at:
                    raise Killed
                return out

            return wrapper

        monkeypatch.setattr(merge, "run_qemu_img", step(merge.run_qemu_img))
        monkeypatch.setattr(intent, "atomic_write", step(intent.atomic_write))
        monkeypatch.setattr(KvmDriver, "_redefine_disk", step(KvmDriver._redefine_disk))
        monkeypatch.setattr(KvmDriver, "_forget", staticmethod(step(KvmDriver._forget)))
        for name in ("blockCommit", "blockJobAbort"):
            monkeypatch.setattr(libvirt.virDomain, name, step(getattr(libvirt.virDomain, name)))


@pytest.mark.parametrize("where", ["top", "middle"])
@pytest.mark.parametrize("running", [True, False], ids=["live", "offline"])
def test_a_merge_killed_at_any_step_converges_on_the_next_release(
    settings: Settings,
    make_vm,
    host_name: str,
    libvirt_conn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    running: bool,
    where: str,
) -> None:
    kill_at = 1
    while True:
        vm = make_vm(size=16 * MIB, data_bytes=2 * MIB, start=running)
        guest = GuestDisk(vm, tmp_path)
        driver = KvmDriver(settings)
        volume = VolumeRef(vm=VmRef(name=vm.name, host=host_name), disk="vda")
        dom = libvirt_conn.lookupByName(vm.name)

        sid, snap = take(driver, volume)
        write_as_guest(guest, running, pattern=0x31, offset=MIB)
        expected_chain = [str(vm.disk)]
        if where == "middle":
            _, kept = take(driver, volume)
            assert kept.overlay
            Path(kept.overlay + BASE_SUFFIX).touch()  # a kept base: the layer above stays
            write_as_guest(guest, running, pattern=0x32, offset=4 * MIB)
            expected_chain = [kept.overlay, str(vm.disk)]
        with monkeypatch.context() as patch:
            killer = StepKiller(patch, kill_at)
            try:
                driver.release(volume=volume, snapshot_id=sid, source=snap, backed_up=False)
                killed = False
            except Killed:
                killed = True
        driver.release(volume=volume, snapshot_id=sid, source=snap, backed_up=False)
        if running:
            assert not dom.blockJobInfo("vda", 0)
        assert chain_of(disk_source(libvirt_conn, vm.name)) == expected_chain, kill_at
        assert_converged(dom, guest)
        vm.destroy()
        if not killed:
            assert killer.steps >= 2  # every step of a real merge was tried
            return
        kill_at += 1


def kill_after_redefinition_onto_the_base(
    monkeypatch: pytest.MonkeyPatch, dom: libvirt.virDomain, *, start_after_commit: bool
) -> None:
    """The offline top merge dies right after it pointed the definition at the base; with
    ``start_after_commit`` an operator started the VM (on the old top) just before."""
    from snapferry.activities.hypervisors.kvm import merge

    real_commit, real_redefine = merge.run_qemu_img, KvmDriver._redefine_disk

    def commit(*args: str) -> str:
        out = real_commit(*args)
        if start_after_commit and args[0] == "commit":
            dom.create()
        return out

    def redefine_then_die(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_redefine(self, *args, **kwargs)
        raise Killed

    monkeypatch.setattr(merge, "run_qemu_img", commit)
    monkeypatch.setattr(KvmDriver, "_redefine_disk", redefine_then_die)


def test_a_vm_started_on_the_base_after_an_interrupted_merge_keeps_those_writes(
    settings: Settings,
    make_vm,
    host_name: str,
    libvirt_conn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the kill the definition names the base, so the operator's start runs there:
    its writes, over ranges the old top also holds, are the disk, not the top's."""
    vm = make_vm(size=16 * MIB, data_bytes=2 * MIB, start=False)
    guest = GuestDisk(vm, tmp_path)
    driver = KvmDriver(settings)
    volume = VolumeRef(vm=VmRef(name=vm.name, host=host_name), disk="vda")
    sid, snap = take(driver, volume)
    assert snap.overlay
    offline_write(snap.overlay, pattern=0x55, offset=MIB, length=MIB)
    patch_reference(guest.expected, guest.expected, pattern=0x55, offset=MIB, length=MIB)
    dom = libvirt_conn.lookupByName(vm.name)
    with monkeypatch.context() as patch:
        kill_after_redefinition_onto_the_base(patch, dom, start_after_commit=False)
        with pytest.raises(Killed):
            driver.release(volume=volume, snapshot_id=sid, source=snap, backed_up=False)
    dom.create()
    assert disk_source(libvirt_conn, vm.name) == str(vm.disk)
    guest.write(pattern=0x77, offset=MIB, length=MIB)
    dom.destroy()
    driver.release(volume=volume, snapshot_id=sid, source=snap, backed_up=False)
    assert disk_source(libvirt_conn, vm.name) == str(vm.disk)
    assert_converged(dom, guest)


def test_a_vm_managed_saved_on_the_old_top_after_an_interrupted_merge_still_resumes(
    settings: Settings,
    make_vm,
    host_name: str,
    libvirt_conn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The VM runs on the old top (started between commit and redefinition) and is then
    managed-saved (libvirt-guests at host shutdown): its saved definition names the top,
    which must survive every later operation until the VM has resumed on it."""
    vm = make_vm(size=16 * MIB, data_bytes=2 * MIB, start=False)
    guest = GuestDisk(vm, tmp_path)
    driver = KvmDriver(settings)
    volume = VolumeRef(vm=VmRef(name=vm.name, host=host_name), disk="vda")
    sid, snap = take(driver, volume)
    assert snap.overlay
    offline_write(snap.overlay, pattern=0x55, offset=MIB, length=MIB)
    patch_reference(guest.expected, guest.expected, pattern=0x55, offset=MIB, length=MIB)
    dom = libvirt_conn.lookupByName(vm.name)
    with monkeypatch.context() as patch:
        kill_after_redefinition_onto_the_base(patch, dom, start_after_commit=True)
        with pytest.raises(Killed):
            driver.release(volume=volume, snapshot_id=sid, source=snap, backed_up=False)
    assert disk_source(libvirt_conn, vm.name) == snap.overlay
    dom.managedSave(0)
    driver.release(volume=volume, snapshot_id=sid, source=snap, backed_up=False)
    assert Path(snap.overlay).exists()
    dom.create()  # resumes from the managed save, on the top
    assert dom.isActive() and disk_source(libvirt_conn, vm.name) == snap.overlay
    driver.release(volume=volume, snapshot_id=sid, source=snap, backed_up=False)
    assert disk_source(libvirt_conn, vm.name) == str(vm.disk)
    assert_converged(dom, guest)
