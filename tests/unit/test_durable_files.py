"""Durable, private files: fsync before every publishing
rename, owner-only modes whatever the umask, atomic small files, and a host-wide domain lock
that serialises processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapferry.activities.contracts import BackupPlan, VmRef, VolumeRef
from snapferry.activities.errors import ChainBusy
from snapferry.activities.hypervisors.domain_lock import domain_lock, lock_path
from snapferry.activities.storage import files
from snapferry.activities.storage.secondary import SecondaryStore
from tests.spies import record_fsyncs_and_renames


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_fsync_replace_syncs_the_file_then_renames_then_syncs_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = record_fsyncs_and_renames(monkeypatch)
    src, dst = tmp_path / "a.partial", tmp_path / "a"
    src.write_bytes(b"x")
    files.fsync_replace(src, dst)
    assert events == [("fsync", str(src)), ("replace", str(dst)), ("fsync", str(tmp_path))]


def test_atomic_write_is_all_or_nothing_and_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loose_umask: None
) -> None:
    path = tmp_path / "plan.json"
    files.atomic_write(path, "old")
    assert path.read_text() == "old" and path.stat().st_mode & 0o777 == files.FILE_MODE

    def crash(*_a: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        files.atomic_write(path, "new")
    assert path.read_text() == "old"  # never half-written


def test_save_plan_is_atomic_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loose_umask: None
) -> None:
    store = SecondaryStore(tmp_path)
    volume = VolumeRef(vm=VmRef(name="vm1", host="h1"), disk="vda")
    store.target(volume, "0" * 8 + "-0000-0000-0000-" + "0" * 12)
    sid = "1" * 8 + "-0000-0000-0000-" + "0" * 12
    store.save_plan(volume, sid, BackupPlan())
    path = store.plan_path(volume, sid)
    assert path.stat().st_mode & 0o777 == 0o600
    assert store.directory(volume).stat().st_mode & 0o777 == 0o700
    monkeypatch.setattr(os, "replace", lambda *_a: (_ for _ in ()).throw(OSError("cut")))
    with pytest.raises(OSError):
        store.save_plan(volume, sid, BackupPlan(depth=3))
    assert store.load_plan(volume, sid) == BackupPlan()


def test_make_dirs_sets_the_mode_of_what_it_creates_only(tmp_path: Path, loose_umask: None) -> None:
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o755)
    files.make_dirs(existing / "a" / "b")
    assert (existing / "a").stat().st_mode & 0o777 == 0o700
    assert (existing / "a" / "b").stat().st_mode & 0o777 == 0o700
    assert existing.stat().st_mode & 0o777 == 0o755


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_the_domain_lock_serialises_processes_and_fails_busy_when_held(tmp_path: Path) -> None:
    path = lock_path(tmp_path, "vm1")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), "1.5"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with (
            pytest.raises(ChainBusy, match="another snapferry process"),
            domain_lock(tmp_path, "vm1", timeout_s=0.3),
        ):
            pytest.fail("entered a lock another process holds")
        assert time.monotonic() - started < 1.0
        # Another VM's lock is independent.
        with domain_lock(tmp_path, "vm2", timeout_s=0.1):
            pass
        # Once the holder is gone (the kernel drops its flock), the lock is ours.
        with domain_lock(tmp_path, "vm1", timeout_s=5):
            assert holder.poll() is not None
    finally:
        holder.kill()
        holder.wait()


def test_the_domain_lock_name_cannot_escape_its_directory(tmp_path: Path) -> None:
    assert lock_path(tmp_path, "../../etc/x").parent == tmp_path


def test_progress_signals_stay_bounded_across_attempts() -> None:
    """A retry starts its own clock again; the signal interval must follow the backup's
    age, or a backup retried N times sends N times the early burst of signals."""
    from datetime import UTC, datetime, timedelta

    from snapferry.activities.progress import signal_interval

    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    started_a_day_ago = now - timedelta(days=1)
    # A fresh attempt of a day-old backup signals every 86.4 s, not every 2 s.
    assert signal_interval(
        base_s=2.0, backup_started=started_a_day_ago, now=now.timestamp()
    ) == pytest.approx(86.4)
    assert signal_interval(base_s=2.0, backup_started=now, now=now.timestamp()) == 2.0

    def signals_over(attempts: int, attempt_s: float) -> int:
        """Signals of a backup made of ``attempts`` back-to-back attempts, each of which
        computes its interval as the activity does (from the backup's start)."""
        total = 0
        for n in range(attempts):
            t, end = n * attempt_s, (n + 1) * attempt_s
            while t < end:
                total += 1
                t += signal_interval(base_s=2.0, backup_started=now, now=now.timestamp() + t)
        return total

    # 50 one-hour attempts: a per-attempt clock would send about 50 x 1600 = 80000.
    assert signals_over(50, 3600) < 8000
    assert signals_over(1, 7 * 24 * 3600) < 10000  # one attempt of a week
