"""Byte-level helpers for VDI files: sparse raw files on the local filesystem.

Disks are mostly zeros in tests, so every copy and scan walks data extents
(``SEEK_DATA``/``SEEK_HOLE``) instead of reading whole files. On filesystems
without hole reporting the whole file simply counts as data, which is still correct.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


def create_sparse(path: Path, size: int) -> None:
    """An all-zero disk of ``size`` bytes that uses no blocks."""
    with open(path, "wb") as f:
        f.truncate(size)


def data_extents(f: BinaryIO, size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` ranges below ``size`` that may hold non-zero bytes."""
    fd, pos = f.fileno(), 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def data_blocks(f: BinaryIO, size: int, block_size: int) -> set[int]:
    """Indices of ``block_size`` blocks touched by any data extent."""
    blocks: set[int] = set()
    for start, end in data_extents(f, size):
        blocks.update(range(start // block_size, (end - 1) // block_size + 1))
    return blocks


def read_at(f: BinaryIO, offset: int, length: int) -> bytes:
    """Read exactly ``length`` bytes, zero-padding past the end of the file."""
    f.seek(offset)
    data = f.read(length)
    return data + bytes(length - len(data))


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def copy_sparse_to(src: Path, dst: Path, size: int) -> None:
    """Write a sparse copy of ``src`` (``size`` bytes) to ``dst`` atomically.

    The copy goes to a temp file that then replaces ``dst``, so a reader that
    already opened ``dst`` keeps seeing the old bytes (as a running export would).
    """
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".copy-")
    try:
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            fout.truncate(size)
            for start, end in data_extents(fin, size):
                fin.seek(start)
                fout.seek(start)
                left = end - start
                while left > 0:
                    chunk = fin.read(min(CHUNK, left))
                    if not chunk:
                        break
                    fout.write(chunk)
                    left -= len(chunk)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def allocated_bytes(path: Path) -> int:
    """Physical utilisation as XAPI would report it (blocks actually used)."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0
