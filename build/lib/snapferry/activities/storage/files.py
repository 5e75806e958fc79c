"""Durable, private files: the one place that decides how snapferry writes what it keeps.

Everything snapferry writes holds tenant data or facts about it (backups, chunk digests,
manifests, plans, templates, restored volumes, reverted layers), so it is created owner-only
whatever the process umask is, and every rename that publishes a file is preceded by an
fsync of the file and followed by an fsync of its directory: ``qemu-img`` and plain writes
do not fsync, and a crash after an unsynced rename can leave the final name pointing at a
file with none of its bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_replace(src: str | Path, dst: str | Path) -> None:
    """Publish ``src`` as ``dst``: its bytes on the medium first, then the rename, then the
    directory entry on the medium too."""
    fsync_file(src)
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def atomic_write(path: Path, data: str | bytes, *, mode: int = FILE_MODE) -> None:
    """Write a small file all or nothing: a temporary name beside it, fsynced, renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def make_dirs(path: Path, *, mode: int = DIR_MODE) -> None:
    """``mkdir -p`` whose new directories get ``mode`` exactly (mkdir's is masked by the
    umask); directories that already exist are left as their owner set them."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for d in missing:
        os.chmod(d, mode)
