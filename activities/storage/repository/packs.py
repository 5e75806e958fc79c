"""Pack files: many blobs in one file, so a TiB is thousands of files on NFS, not millions.

restic and Kopia pack small blobs the same way; Proxmox Backup Server keeps one file per
4 MiB chunk, which is what makes its chunks that large. A pack is::

    b"SFPACK01"
    blob, blob, ...                       each as blobs.py stores it
    table                                 a blob: one entry per blob (TABLE_ENTRY)
    table ID (32) | table length (u32 LE) | b"SFPKEND1"

The table repeats what the index says about the pack, so an index can be rebuilt from the
packs alone. A pack is written under a temporary name, fsynced, and renamed to a random
256-bit name: packs are never changed once named, so a copy to a second store is complete or
absent, and two stores holding one name hold one content. Its bytes are not hashed as a
whole (that would cost a second SHA-256 of every byte stored, the copy's largest cost on
two cores): each blob carries its own check, the GCM tag when sealed, its ID otherwise.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import BackupCorrupt
from ..copy_engine import sync_file_range
from ..files import FILE_MODE, fsync_dir, make_dirs
from .blobs import ID_BYTES, BlobCodec

MAGIC = b"SFPACK01"
END_MAGIC = b"SFPKEND1"
FOOTER = struct.Struct("<32sI8s")
TABLE_ENTRY = struct.Struct("<32sBQI")  # blob id, kind, offset, stored length
CHUNK, SEGMENT = 0, 1
PACK_TARGET_BYTES = 32 * 1024 * 1024
_FLUSH_BYTES = 1024 * 1024


@dataclass(frozen=True)
class BlobLocation:
    blob_id: bytes
    kind: int
    pack: str  # hex name
    offset: int
    length: int


def pack_path(root: Path, name: str) -> Path:
    return root / "packs" / name[:2] / f"{name}.pack"


class PackWriter:
    """Appends encoded blobs to one open pack; ``finish`` publishes it and says what is in it."""

    def __init__(self, root: Path, codec: BlobCodec) -> None:
        self.root = root
        self.codec = codec
        tmp_dir = root / "packs" / "tmp"
        make_dirs(tmp_dir)
        self.tmp = tmp_dir / f"{uuid.uuid4().hex}.partial"
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self.size = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._synced = 0
        self.entries: list[tuple[bytes, int, int, int]] = []
        self._write(MAGIC)

    def _write(self, data: bytes) -> int:
        """Append ``data`` (buffered: blobs go to the file in batches of ``_FLUSH_BYTES``,
        one ``writev`` each, so a pack of 64 KiB blobs costs few system calls)."""
        offset = self.size
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.size += len(data)
        if self._pending_bytes >= _FLUSH_BYTES:
            self._flush()
        return offset

    def _flush(self) -> None:
        views = [memoryview(b) for b in self._pending]
        while views:
            n = os.writev(self.fd, views)
            while views and n >= len(views[0]):  # a short write goes on where it stopped
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
        self._pending.clear()
        self._pending_bytes = 0
        if sync_file_range is not None:  # start writeback now: the seal's fsync finds little
            with contextlib.suppress(OSError):
                sync_file_range(self.fd, self._synced, self.size - self._synced, 2)
            self._synced = self.size

    def add(self, blob_id: bytes, kind: int, stored: bytes) -> None:
        offset = self._write(stored)
        self.entries.append((blob_id, kind, offset, len(stored)))

    @property
    def full(self) -> bool:
        return self.size >= PACK_TARGET_BYTES

    def finish(self) -> list[BlobLocation]:
        """fsync, rename to the content's SHA-256, fsync the directory: then it is durable."""
        table = b"".join(TABLE_ENTRY.pack(*entry) for entry in self.entries)
        table_id = self.codec.blob_id(table)
        stored = self.codec.encode(table_id, table)
        self._write(stored)
        self._write(FOOTER.pack(table_id, len(stored), END_MAGIC))
        self._flush()
        os.fsync(self.fd)
        os.close(self.fd)
        name = secrets.token_hex(32)
        final = pack_path(self.root, name)
        make_dirs(final.parent)
        os.replace(self.tmp, final)
        fsync_dir(final.parent)
        return [BlobLocation(i, k, name, o, n) for i, k, o, n in self.entries]

    def abort(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


def read_blob(root: Path, location: BlobLocation, codec: BlobCodec) -> bytes:
    """One blob's plaintext, checked against its ID (BackupCorrupt otherwise)."""
    where = f"pack {location.pack} offset {location.offset}"
    try:
        fd = os.open(pack_path(root, location.pack), os.O_RDONLY)
    except FileNotFoundError:
        raise BackupCorrupt(f"{where}: the pack is missing") from None
    try:
        stored = os.pread(fd, location.length, location.offset)
    finally:
        os.close(fd)
    if len(stored) != location.length:
        raise BackupCorrupt(f"{where}: the pack is truncated")
    return codec.decode(location.blob_id, stored, where=where)


def pack_table(path: Path, codec: BlobCodec) -> list[BlobLocation]:
    """What a pack holds, from its own table (index rebuilds, verify, sync checks)."""
    name = path.name.removesuffix(".pack")
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < len(MAGIC) + FOOTER.size:
            raise BackupCorrupt(f"pack {name}: too short to be a pack")
        f.seek(size - FOOTER.size)
        table_id, length, end = FOOTER.unpack(f.read(FOOTER.size))
        if end != END_MAGIC or length > size:
            raise BackupCorrupt(f"pack {name}: no pack footer (truncated or not a pack)")
        f.seek(size - FOOTER.size - length)
        table = codec.decode(table_id, f.read(length), where=f"pack {name} table")
    if len(table) % TABLE_ENTRY.size:
        raise BackupCorrupt(f"pack {name}: the table is malformed")
    return [
        BlobLocation(i, k, name, o, n)
        for i, k, o, n in (
            TABLE_ENTRY.unpack_from(table, p) for p in range(0, len(table), TABLE_ENTRY.size)
        )
    ]


def all_packs(root: Path) -> Iterator[Path]:
    base = root / "packs"
    if not base.is_dir():
        return
    for sub in sorted(base.iterdir()):
        if sub.name != "tmp" and sub.is_dir():
            yield from sorted(sub.glob("*.pack"))


assert ID_BYTES == 32  # TABLE_ENTRY's "32s"
