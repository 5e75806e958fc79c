"""One writer per VM disk chain on a host, across processes: a per-domain ``flock``.

A thread lock would serialise one worker's operations only, and nothing stops a second worker
for the same host (``snapferry up`` beside the systemd unit, a restarted unit whose old
process still drains). Two chain writers on one domain can pivot each other's block jobs or
merge a layer the other just froze. ``flock`` is held by an open file description, so it
serialises threads of one process as well as processes, and the kernel drops it when its
holder dies: a killed worker never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import ChainBusy

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def lock_path(lock_dir: Path, vm: str) -> Path:
    return lock_dir / f"domain-{_SAFE.sub('_', vm)}.lock"


@contextlib.contextmanager
def domain_lock(lock_dir: Path, vm: str, *, timeout_s: float) -> Iterator[None]:
    """Hold the VM's lock; wait up to ``timeout_s``, then raise the retryable ChainBusy so
    the activity backs off rather than occupying a worker slot indefinitely."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(lock_dir, vm)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ChainBusy(
                        f"VM {vm!r}: another snapferry process on this host is changing its"
                        f" disks (lock {path} held for over {timeout_s:g} s); retrying later"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
