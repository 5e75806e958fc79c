"""Application-consistent (quiesced) KVM snapshots, with a real QEMU guest agent.

The guest (``agent_guest.py``) appends to a file it never fsyncs, and its fsfreeze hook
stops the writer and appends ``MARKER``: a quiesced snapshot holds every line up to the
marker, a crash-consistent one next to nothing. Everything is real: libvirtd, QEMU (TCG),
Debian's kernel, busybox and ``qemu-ga``; the end-to-end test goes through the Temporal
dev server and the workers and reads the backup on secondary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    Consistency,
    Quiesce,
    SnapshotState,
    VmRef,
    VmSnapshotOperation,
    VmSnapshotRequest,
    VmSnapshotState,
    VmSnapshotType,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import HypervisorUnavailable, QuiesceUnavailable
from snapferry.activities.hypervisors.kvm import KvmDriver
from snapferry.activities.hypervisors.kvm.export_vm import agent_answers
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB

from . import agent_guest as ag
from .guest import RealGuest, boot, define_guest, find_kernel, fsck_after_replay
from .helpers import chain_of, disk_source, request_for

pytestmark = pytest.mark.integration

DISK_SIZE = 64 * MIB
BOOT_TIMEOUT = 90.0


def wait_for(what: str, ok, timeout: float = 60.0, guest: RealGuest | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not ok():
        tail = f"\n{guest.tail()}" if guest is not None else ""
        assert time.monotonic() < deadline, f"{what} not after {timeout:.0f}s{tail}"
        time.sleep(0.05)


@contextlib.contextmanager
def agent_guest(
    conn: libvirt.virConnect,
    tmp_path: Path,
    *,
    freeze_delay_s: float = 0.0,
    refuse: bool = False,
    fail_thaw: bool = False,
    no_disk: bool = False,
    directory: str = "primary",
) -> Iterator[RealGuest]:
    """A booted agent guest whose agent answers and whose writer is writing."""
    kernel, version = find_kernel()
    initrd = ag.build_agent_initramfs(tmp_path / f"initrd-{os.getpid()}-{time.time_ns()}", version)
    guest = define_guest(
        conn,
        directory=tmp_path / directory,
        initrd=initrd,
        kernel=kernel,
        disk_size=DISK_SIZE,
        cmdline=ag.cmdline(
            freeze_delay_s, refuse_freeze=refuse, fail_thaw=fail_thaw, no_disk=no_disk
        ),
        agent=True,
    )
    try:
        boot(guest, timeout=BOOT_TIMEOUT)
        wait_for("the agent", lambda: agent_answers(guest.domain), guest=guest)
        wait_for("the writer", lambda: appended(guest) >= 100, guest=guest)
        yield guest
    finally:
        guest.destroy()
        initrd.unlink(missing_ok=True)


def appended(guest: RealGuest) -> int:
    """The writer's last ``APPENDED N`` on the console: lines 1..N are in its page cache."""
    found = [int(m.group(1)) for line in guest.lines() if (m := ag.APPENDED_RE.fullmatch(line))]
    return found[-1] if found else 0


def console_times(guest: RealGuest, pattern) -> list[float]:  # type: ignore[no-untyped-def]
    return [float(m.group(1)) for line in guest.lines() if (m := pattern.fullmatch(line))]


def log_in(image: str, fmt: str, scratch: Path) -> list[str]:
    """The guest's ``/log`` in a disk image: a raw copy, its journal replayed, dumped."""
    copy = scratch / f"{Path(image).name}.{time.time_ns()}.raw"
    subprocess.run(
        ["qemu-img", "convert", "-q", "-U", "-f", fmt, "-O", "raw", image, str(copy)], check=True
    )
    try:
        fsck_after_replay(copy)
        out = scratch / f"{copy.name}.log"
        subprocess.run(
            ["debugfs", "-R", f"dump /log {out}", str(copy)], capture_output=True, check=True
        )
        return ag.log_lines(out.read_bytes()) if out.exists() else []
    finally:
        copy.unlink(missing_ok=True)


def volume(guest: RealGuest) -> VolumeRef:
    return VolumeRef(vm=VmRef(name=guest.name, host="local"), disk="vda")


@pytest.fixture
def driver(settings: Settings) -> KvmDriver:
    return KvmDriver(settings)


async def test_a_quiesced_backup_holds_what_the_guest_wrote_before_the_freeze(
    client: Client,
    settings: Settings,
    workers: None,
    libvirt_conn: libvirt.virConnect,
    host_name: str,
    tmp_path: Path,
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with agent_guest(libvirt_conn, tmp_path) as guest:
        quiesced_req = request_for(guest.name, host_name, settings).model_copy(
            update={"quiesce": Quiesce.YES}
        )
        before = appended(guest)
        answer = await starter.create_snapshot(client, quiesced_req)
        assert answer.state == SnapshotState.CREATED_ON_PRIMARY
        assert answer.consistency == Consistency.APPLICATION
        assert answer.primary is not None and answer.primary.consistency_note is None
        record = await starter.wait_settled(client, answer.id, timeout=180)
        assert record.state == SnapshotState.BACKED_UP and record.backup is not None
        quiesced = await asyncio.to_thread(log_in, record.backup.path, "raw", scratch)
        # Every line the writer had appended before the freeze, then the hook's marker.
        lines_frozen = ag.check_quiesced_log(quiesced)
        assert lines_frozen >= before
        freezes = console_times(guest, ag.FREEZE_RE)
        thaws = console_times(guest, ag.THAW_RE)
        assert len(freezes) == 1 and thaws and thaws[-1] >= freezes[0]
        # The writer goes on after the thaw.
        wait_for("writing after the thaw", lambda: appended(guest) > lines_frozen + 100)

        # Crash-consistent: what the guest wrote since is in its page cache only.
        written = appended(guest)
        full = settings.backup_defaults.model_copy(update={"full": True})  # read whole
        crash_req = request_for(guest.name, host_name, settings).model_copy(update={"backup": full})
        crash = await starter.create_snapshot(client, crash_req)
        assert crash.consistency == Consistency.CRASH
        crash_record = await starter.wait_settled(client, crash.id, timeout=180)
        assert crash_record.backup is not None
        crashed = await asyncio.to_thread(log_in, crash_record.backup.path, "raw", scratch)
        assert len(crashed) < written, "a crash-consistent image held unflushed lines"
        assert crashed[: len(quiesced)] == quiesced
        assert len(console_times(guest, ag.FREEZE_RE)) == 1  # no freeze without --quiesce

        # A VM snapshot asks the same of the guest.
        vm_req = VmSnapshotRequest(
            snapshot_id=new_snapshot_id(),
            vm=VmRef(name=guest.name, host=host_name),
            quiesce=Quiesce.YES,
        )
        vm_snap = await starter.create_vm_snapshot(client, vm_req)
        assert vm_snap.state == VmSnapshotState.READY
        assert vm_snap.consistency == Consistency.APPLICATION
        assert len(console_times(guest, ag.FREEZE_RE)) == 2
        assert vm_snap.taken is not None
        frozen_image = chain_of(vm_snap.taken.overlays["vda"])[1]
        ag.check_quiesced_log(await asyncio.to_thread(log_in, frozen_image, "qcow2", scratch))
        print(
            f"\nquiesced: {lines_frozen} lines and the marker (the writer had appended"
            f" {before} when asked); freeze window {thaws[-1] - freezes[0]:.2f}s (guest clock);"
            f" crash-consistent: {len(crashed)} lines of the {written} written"
        )


def test_no_agent_refuses_yes_and_falls_back_for_try(
    driver: KvmDriver, make_vm, libvirt_conn: libvirt.virConnect
) -> None:
    vm = make_vm(size=8 * MIB, data_bytes=MIB)  # running, and no agent channel
    ref = VolumeRef(vm=VmRef(name=vm.name, host="local"), disk="vda")
    before = chain_of(disk_source(libvirt_conn, vm.name))
    sid = new_snapshot_id()
    with pytest.raises(QuiesceUnavailable, match=r"guest agent does not answer.*nothing was taken"):
        driver.take(volume=ref, snapshot_id=sid, quiesce=Quiesce.YES)
    assert chain_of(disk_source(libvirt_conn, vm.name)) == before
    assert not list(Path(before[0]).parent.glob(f"*{sid}*"))
    tried = driver.take(volume=ref, snapshot_id=new_snapshot_id(), quiesce=Quiesce.TRY)
    assert tried.consistency == Consistency.CRASH
    assert tried.consistency_note and "guest agent does not answer" in tried.consistency_note
    plain = driver.take(volume=ref, snapshot_id=new_snapshot_id())
    assert plain.consistency == Consistency.CRASH and plain.consistency_note is None


def test_a_stopped_vm_is_application_consistent_and_says_why(driver: KvmDriver, make_vm) -> None:
    vm = make_vm(size=8 * MIB, data_bytes=MIB, start=False)
    ref = VolumeRef(vm=VmRef(name=vm.name, host="local"), disk="vda")
    taken = driver.take(volume=ref, snapshot_id=new_snapshot_id(), quiesce=Quiesce.YES)
    assert not taken.vm_was_running
    assert taken.consistency == Consistency.APPLICATION
    assert taken.consistency_note and "stopped" in taken.consistency_note


def test_a_guest_left_frozen_is_thawed_then_snapshotted_quiesced(
    driver: KvmDriver, libvirt_conn: libvirt.virConnect, tmp_path: Path
) -> None:
    with agent_guest(libvirt_conn, tmp_path) as guest:
        # A freeze nobody thawed (as libvirtd dying between its freeze and its thaw leaves).
        assert guest.domain.fsFreeze() >= 1
        stuck = appended(guest)
        time.sleep(1.0)
        assert appended(guest) == stuck  # frozen: the writer waits
        taken = driver.take(
            volume=volume(guest), snapshot_id=new_snapshot_id(), quiesce=Quiesce.YES
        )
        assert taken.consistency == Consistency.APPLICATION
        wait_for("writing after the take", lambda: appended(guest) > stuck + 100, guest=guest)
        ag.check_quiesced_log(log_in(taken.image, taken.image_format, tmp_path))


def test_a_guest_whose_freeze_fails_refuses_yes_and_falls_back_for_try(
    driver: KvmDriver, libvirt_conn: libvirt.virConnect, tmp_path: Path
) -> None:
    with agent_guest(libvirt_conn, tmp_path, refuse=True) as guest:
        before = chain_of(disk_source(libvirt_conn, guest.name))
        with pytest.raises(QuiesceUnavailable, match="could not be frozen"):
            driver.take(volume=volume(guest), snapshot_id=new_snapshot_id(), quiesce=Quiesce.YES)
        assert chain_of(disk_source(libvirt_conn, guest.name)) == before
        assert ag.REFUSED in guest.lines()
        now = appended(guest)
        wait_for("writing after the refusal", lambda: appended(guest) > now + 50, guest=guest)
        tried = driver.take(
            volume=volume(guest), snapshot_id=new_snapshot_id(), quiesce=Quiesce.TRY
        )
        assert tried.consistency == Consistency.CRASH
        assert tried.consistency_note and "could not be frozen" in tried.consistency_note
        assert len(chain_of(disk_source(libvirt_conn, guest.name))) == len(before) + 1


TAKE_IN_A_PROCESS = """
import sys
from snapferry.activities.contracts import Quiesce, VmRef, VolumeRef
from snapferry.activities.hypervisors.kvm import KvmDriver
from snapferry.activities.hypervisors.kvm.export_vm import agent_answers
from snapferry.activities.settings import Settings
ref = VolumeRef(vm=VmRef(name=sys.argv[1], host="local"), disk="vda")
KvmDriver(Settings.from_env()).take(volume=ref, snapshot_id=sys.argv[2], quiesce=Quiesce.YES)
"""


def test_a_worker_killed_while_the_guest_is_frozen_leaves_it_thawed(
    driver: KvmDriver, libvirt_conn: libvirt.virConnect, tmp_path: Path
) -> None:
    with agent_guest(libvirt_conn, tmp_path, freeze_delay_s=3) as guest:
        sid = new_snapshot_id()
        worker = subprocess.Popen([sys.executable, "-c", TAKE_IN_A_PROCESS, guest.name, sid])
        try:
            wait_for("the freeze", lambda: bool(console_times(guest, ag.FREEZE_RE)), guest=guest)
            os.kill(worker.pid, signal.SIGKILL)  # the guest's hook holds the freeze open
        finally:
            worker.wait()
        assert worker.returncode == -signal.SIGKILL
        # libvirtd finishes the call and thaws: the writer goes on by itself.
        wait_for("the thaw", lambda: console_times(guest, ag.THAW_RE), timeout=30, guest=guest)
        stuck = appended(guest)
        wait_for("writing after the thaw", lambda: appended(guest) > stuck + 50, guest=guest)
        # The retried take finds the overlay its killed attempt made, quiesced.
        retried = driver.take(volume=volume(guest), snapshot_id=sid, quiesce=Quiesce.YES)
        assert retried.consistency == Consistency.APPLICATION
        assert retried.overlay == disk_source(libvirt_conn, guest.name)
        ag.check_quiesced_log(log_in(retried.image, retried.image_format, tmp_path))


def test_a_guest_with_nothing_to_freeze_is_not_called_application_consistent(
    driver: KvmDriver, libvirt_conn: libvirt.virConnect, tmp_path: Path
) -> None:
    """Its agent answers, but no file system it would freeze is mounted: the freeze hook
    must not run (libvirt thaws only what was frozen, so the hook's thaw would never come)."""
    with agent_guest(libvirt_conn, tmp_path, no_disk=True) as guest:
        with pytest.raises(QuiesceUnavailable, match="no file system"):
            driver.take(volume=volume(guest), snapshot_id=new_snapshot_id(), quiesce=Quiesce.YES)
        tried = driver.take(
            volume=volume(guest), snapshot_id=new_snapshot_id(), quiesce=Quiesce.TRY
        )
        assert tried.consistency == Consistency.CRASH
        assert tried.consistency_note and "no file system" in tried.consistency_note
        assert not console_times(guest, ag.FREEZE_RE)  # the hook never ran
        now = appended(guest)
        wait_for("the writer going on", lambda: appended(guest) > now + 50, guest=guest)


def test_a_failed_thaw_after_the_snapshot_is_told_apart_from_a_failed_freeze(
    driver: KvmDriver, libvirt_conn: libvirt.virConnect, tmp_path: Path
) -> None:
    """Under a directory whose name holds "agent": an ordinary failure (a stale file where
    the overlay goes) is an ordinary, retryable error; a thaw hook that fails after the
    snapshot was made leaves an application-consistent snapshot that says so."""
    with agent_guest(libvirt_conn, tmp_path, fail_thaw=True, directory="build-agent-01") as guest:
        sid = new_snapshot_id()
        stale = Path(f"{disk_source(libvirt_conn, guest.name)}.snapferry-{sid}.qcow2")
        stale.write_bytes(b"not an overlay" * 100)
        with pytest.raises(HypervisorUnavailable, match="exists"):
            driver.take(volume=volume(guest), snapshot_id=sid, quiesce=Quiesce.YES)
        stale.unlink()
        before = chain_of(disk_source(libvirt_conn, guest.name))
        taken = driver.take(
            volume=volume(guest), snapshot_id=new_snapshot_id(), quiesce=Quiesce.YES
        )
        assert taken.consistency == Consistency.APPLICATION
        assert taken.consistency_note and "thaw" in taken.consistency_note
        assert len(chain_of(disk_source(libvirt_conn, guest.name))) == len(before) + 1
        ag.check_quiesced_log(log_in(taken.image, taken.image_format, tmp_path))
        now = appended(guest)
        wait_for("the writer going on", lambda: appended(guest) > now + 50, guest=guest)


def test_a_disk_and_memory_snapshot_is_not_quiesced(driver: KvmDriver, make_vm) -> None:
    """libvirt quiesces disk-only snapshots only (qemu_snapshot.c requires DISK_ONLY with
    QUIESCE): yes is refused at once, try takes it and says why."""
    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    ref = VmRef(name=vm.name, host="local")

    def op(quiesce: Quiesce) -> VmSnapshotOperation:
        return VmSnapshotOperation(
            snapshot_id=new_snapshot_id(),
            vm=ref,
            type=VmSnapshotType.DISK_AND_MEMORY,
            quiesce=quiesce,
        )

    with pytest.raises(QuiesceUnavailable, match="disk-only"):
        driver.take_vm_snapshot(op(Quiesce.YES))
    taken = driver.take_vm_snapshot(op(Quiesce.TRY))
    assert taken.consistency == Consistency.CRASH and taken.memory is not None
    assert taken.consistency_note and "memory" in taken.consistency_note
