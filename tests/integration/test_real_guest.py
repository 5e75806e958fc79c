"""A volume snapshot of a real Linux guest that writes fsynced files throughout.

Everything is real: the Temporal dev server, the workers, libvirtd and QEMU (TCG), and the
guest, Debian's cloud kernel with a busybox ``/init`` (see ``guest.py``). The guest prints
``WROTE N`` once file N and its directory entry are fsynced, so the console says which files
a point-in-time image of its disk must hold.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import libvirt
import pytest
import pytest_asyncio
from temporalio.client import Client

from snapferry.activities.contracts import SnapshotState
from snapferry.activities.settings import Settings
from snapferry.activities.storage import checksum
from snapferry.activities.storage.secondary import SecondaryStore
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB

from .guest import (
    RealGuest,
    boot,
    build_initramfs,
    check_written_prefix,
    define_guest,
    find_kernel,
    fsck_after_replay,
    read_files,
)
from .helpers import disk_source, request_for

pytestmark = pytest.mark.integration

DISK_SIZE = 128 * MIB
BOOT_TIMEOUT = 60.0  # it mounts its disk in about 2 s; a loaded machine may take longer
BEFORE_TAKE = 20  # files written before the take, so the backup has something to hold
AFTER_MERGE = 20  # files written after the merge, onto the original disk file
# File N+1 is begun only after "WROTE N" is printed, so a file begun before the snapshot's
# instant is at most one past the console's last line at the answer; one more line of slack
# covers the console's delay (microseconds, from the guest's tty to QEMU's log file).
CONSOLE_SLACK = 2
LONGEST_PAUSE = 5.0  # seconds without a new file: far more than a take or a merge takes


@pytest_asyncio.fixture
async def real_guest(libvirt_conn: libvirt.virConnect, tmp_path: Path) -> AsyncIterator[RealGuest]:
    """The guest, booted until it has mounted its disk; destroyed with its files after.
    (It boots in a thread: the in-process workers share the event loop.)"""
    kernel, version = find_kernel()
    initrd = build_initramfs(tmp_path / "initrd.gz", version)
    guest = define_guest(
        libvirt_conn,
        directory=tmp_path / "primary",
        initrd=initrd,
        kernel=kernel,
        disk_size=DISK_SIZE,
    )
    try:
        await asyncio.to_thread(boot, guest, timeout=BOOT_TIMEOUT)
        guest.start_watching()
        yield guest
    finally:
        guest.destroy()
        initrd.unlink(missing_ok=True)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """Where the test checks its copies of the disks; removed after."""
    path = tmp_path / "checks"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def copy_of(src: Path, dst: Path, fmt: str) -> Path:
    """A raw copy to check (e2fsck writes to what it checks)."""
    subprocess.run(
        ["qemu-img", "convert", "-q", "-U", "-f", fmt, "-O", "raw", str(src), str(dst)],
        check=True,
    )
    return dst


@pytest.mark.kvm_full_backups  # follows the active commit and pivot under a writing guest
async def test_backup_of_a_writing_guest_is_consistent_and_the_guest_never_stops(
    client: Client,
    settings: Settings,
    workers: None,
    real_guest: RealGuest,
    host_name: str,
    scratch: Path,
    libvirt_conn: libvirt.virConnect,
) -> None:
    guest = real_guest
    original = disk_source(libvirt_conn, guest.name)
    await asyncio.to_thread(guest.wait_wrote, BEFORE_TAKE, timeout=30)

    # The take. Every file reported before the request is durable on the frozen image; the
    # snapshot's instant lies between the request and the answer.
    before_request = guest.last_wrote()
    answer = await starter.create_snapshot(client, request_for(guest.name, host_name, settings))
    at_answer = guest.last_wrote()
    assert answer.state == SnapshotState.CREATED_ON_PRIMARY
    assert answer.primary is not None and answer.primary.vm_was_running
    assert answer.primary.image == original  # the guest's file is frozen, an overlay takes
    assert (
        answer.primary.overlay and disk_source(libvirt_conn, guest.name) == answer.primary.overlay
    )
    assert guest.running()

    record = await starter.wait_settled(client, answer.id, timeout=120)
    after_merge = guest.last_wrote()
    assert record.state == SnapshotState.BACKED_UP and record.backup is not None
    assert record.primary_released
    # The merge pivoted the running guest back onto its original file, overlay gone.
    assert guest.running()
    assert disk_source(libvirt_conn, guest.name) == original
    assert disk_source(libvirt_conn, guest.name, inactive=True) == original
    leftovers = [p.name for p in Path(original).parent.glob(Path(original).name + ".snapferry-*")]
    assert leftovers == []

    # (c) The guest wrote on during the backup and the merge, and goes on after it, onto
    # its original file; it was never paused, nor stopped writing for long (the watcher
    # samples it every 50 ms from its mount on).
    assert after_merge > at_answer, "the guest wrote nothing while the backup ran"
    await asyncio.to_thread(guest.wait_wrote, after_merge + AFTER_MERGE, timeout=30)
    # Then it stops as at a power cut (before this test's own disk-heavy checks, which would
    # slow its fsyncs down).
    writing_until = time.monotonic()
    await asyncio.to_thread(guest.domain.destroy)
    destroy_seconds = time.monotonic() - writing_until
    guest.stop_watching()
    pause = guest.longest_pause(writing_until)
    assert pause < LONGEST_PAUSE, f"the guest wrote nothing for {pause:.1f}s"
    states = {state for at, state in guest.states if at <= writing_until}
    assert states == {libvirt.VIR_DOMAIN_RUNNING}, f"not always running: {guest.states}"
    final = guest.check_console()[-1]  # WROTE 1..final in order, and no error line at all

    # (a) The backup on secondary: a raw image, as its manifest says, checksum matching, a
    # file system that needs no more than its journal replayed.
    backup = Path(record.backup.path)
    manifest = SecondaryStore.read_manifest(Path(record.backup.manifest_path))
    assert manifest.path == str(backup) and manifest.format == "raw" and manifest.depth == 0
    assert manifest.virtual_size == DISK_SIZE == backup.stat().st_size
    chunk_size, _ = checksum.parse_checksum(manifest.checksum)
    assert checksum.file_checksum(backup, chunk_size)[0] == manifest.checksum
    backup_copy = copy_of(backup, scratch / "backup.raw", "raw")
    backup_fsck = fsck_after_replay(backup_copy)

    # (b) It holds every file reported before the take, exactly, and none begun after it.
    in_backup = check_written_prefix(
        read_files(backup_copy, scratch / "backup-files"),
        must_have=before_request,
        at_most=at_answer + CONSOLE_SLACK,
    )

    # (d) The live disk, the original file again, holds every file the console reported and
    # needs no more than its journal replayed.
    live_copy = copy_of(Path(original), scratch / "live.raw", "qcow2")
    live_fsck = fsck_after_replay(live_copy)
    on_live = check_written_prefix(
        read_files(live_copy, scratch / "live-files"),
        must_have=final,
        at_most=final + CONSOLE_SLACK,
    )

    print(
        f"\nreal guest: mounted after {guest.boot_seconds:.1f}s; files reported before the"
        f" take {before_request}, at its answer {at_answer}, in the backup {in_backup},"
        f" after the merge {after_merge}, at the end {final} (live disk {on_live});"
        f" longest pause {pause:.2f}s; destroy took {destroy_seconds:.1f}s; journal replayed:"
        f" backup {'recovering journal' in backup_fsck}, live {'recovering journal' in live_fsck}"
    )
