"""The blob index: which pack holds a blob, in sorted files looked up without loading them.

A writer adds an index file for the packs it has published (at every checkpoint); once there
are more than ``COMPACT_AT`` files, one process merges them (a streaming k-way merge, under
the index lock). Each file is::

    b"SFIDX001" | count (u64 LE) | records sorted by blob ID (RECORD)

Lookups bisect each file through ``mmap``, so memory stays flat however many blobs the
repository holds (restic keeps its whole index in memory; a TiB of 64 KiB chunks would be
16 million entries). A blob found twice (two writers stored it at once) is found once: any
copy will do. Index files hold blob IDs (keyed when encrypted) and pack names only.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import mmap
import os
import struct
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..files import atomic_write, fsync_dir, make_dirs
from .packs import BlobLocation

MAGIC = b"SFIDX001"
HEADER = struct.Struct("<8sQ")
RECORD = struct.Struct("<32s32sQIB")  # blob id, pack name (raw), offset, length, kind
COMPACT_AT = 16


def _record(loc: BlobLocation) -> bytes:
    return RECORD.pack(loc.blob_id, bytes.fromhex(loc.pack), loc.offset, loc.length, loc.kind)


def _location(raw: bytes | memoryview) -> BlobLocation:
    blob_id, pack, offset, length, kind = RECORD.unpack(raw)
    return BlobLocation(blob_id, kind, pack.hex(), offset, length)


def write_index_file(directory: Path, locations: Iterable[BlobLocation]) -> Path | None:
    records = sorted(_record(loc) for loc in locations)
    if not records:
        return None
    make_dirs(directory)
    path = directory / f"{uuid.uuid4().hex}.idx"
    atomic_write(path, HEADER.pack(MAGIC, len(records)) + b"".join(records))
    return path


class _IndexFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        magic, self.count = HEADER.unpack_from(self.map, 0)
        if magic != MAGIC or HEADER.size + self.count * RECORD.size != len(self.map):
            raise ValueError(f"{path} is not a snapferry index file")

    def _id_at(self, i: int) -> bytes:
        start = HEADER.size + i * RECORD.size
        return self.map[start : start + 32]

    def find(self, blob_id: bytes) -> BlobLocation | None:
        i = self._position(blob_id)
        return None if i is None else self._location_at(i)

    def _position(self, blob_id: bytes) -> int | None:
        """Interpolation search: blob IDs are hashes, spread evenly over the ID space, so
        the first 8 bytes say about where an ID sits; a few probes find it (or its absence)
        where a bisection of 16 million records takes 24, and each probe is Python."""
        lo, hi = 0, self.count  # the ID, if present, is in [lo, hi)
        if not hi:
            return None
        want = int.from_bytes(blob_id[:8], "big")
        low_key, high_key = 0, 1 << 64
        while hi - lo > 8:
            span = high_key - low_key
            guess = lo + ((want - low_key) * (hi - lo)) // span if span > 0 else lo
            guess = min(max(guess, lo), hi - 1)
            probe = self._id_at(guess)
            if probe == blob_id:
                return guess
            key = int.from_bytes(probe[:8], "big")
            if probe < blob_id:
                lo, low_key = guess + 1, key
            else:
                hi, high_key = guess, key + 1
            if high_key <= low_key:
                break
        while lo < hi:  # the last few (or a run of equal prefixes): a bisection
            mid = (lo + hi) // 2
            if self._id_at(mid) < blob_id:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.count and self._id_at(lo) == blob_id:
            return lo
        return None

    def copies(self, blob_id: bytes) -> list[BlobLocation]:
        """Every record of the blob in this file (a merged file keeps each copy, next to
        each other in ID order)."""
        i = self._position(blob_id)
        if i is None:
            return []
        lo = i
        while lo > 0 and self._id_at(lo - 1) == blob_id:
            lo -= 1
        hi = i + 1
        while hi < self.count and self._id_at(hi) == blob_id:
            hi += 1
        return [self._location_at(k) for k in range(lo, hi)]

    def _location_at(self, i: int) -> BlobLocation:
        start = HEADER.size + i * RECORD.size
        return _location(self.map[start : start + RECORD.size])

    def records(self) -> Iterator[bytes]:
        for i in range(self.count):
            start = HEADER.size + i * RECORD.size
            yield self.map[start : start + RECORD.size]

    def close(self) -> None:
        self.map.close()


class BlobIndex:
    """The index files of one repository as they were when opened (plus ``refresh``)."""

    def __init__(self, root: Path) -> None:
        self.directory = root / "index"
        self.lock_path = root / "locks" / "index"
        self.files: dict[Path, _IndexFile] = {}
        self.refresh()

    def refresh(self) -> None:
        present = set(self.directory.glob("*.idx")) if self.directory.is_dir() else set()
        for path in list(self.files):
            if path not in present:
                self.files.pop(path).close()
        for path in sorted(present - set(self.files)):
            with contextlib.suppress(FileNotFoundError):  # compacted away meanwhile
                self.files[path] = _IndexFile(path)

    def find(self, blob_id: bytes) -> BlobLocation | None:
        for f in self.files.values():
            found = f.find(blob_id)
            if found is not None:
                return found
        return None

    def add(self, locations: list[BlobLocation]) -> None:
        """A new index file for ``locations``, written and opened under the index lock, so
        that another process's merge cannot delete it in between."""
        with self.locked():
            path = write_index_file(self.directory, locations)
            if path is not None:
                self.files[path] = _IndexFile(path)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        make_dirs(self.lock_path.parent)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def sorted_records(self, *, all_copies: bool = False) -> Iterator[BlobLocation]:
        """Every entry, in blob-ID order (streaming: flat memory); a blob stored twice is
        given once, or each of its copies with ``all_copies``."""
        last = None
        for raw in heapq.merge(*(f.records() for f in self.files.values())):
            blob_id = raw[:32]
            if all_copies or blob_id != last:
                last = blob_id
                yield _location(raw)

    def rewrite(self, *, drop_packs: frozenset[str] = frozenset()) -> None:
        """Merge every file into one, leaving out entries of ``drop_packs`` (gone after gc)."""
        with self.locked():
            self.refresh()
            old = list(self.files)
            if len(old) <= 1 and not drop_packs:
                return
            make_dirs(self.directory)
            tmp = self.directory / f".{uuid.uuid4().hex}.merging"
            count = 0
            with open(tmp, "wb") as out:
                out.write(HEADER.pack(MAGIC, 0))
                for loc in self.sorted_records(all_copies=True):  # every copy: one may be damaged
                    if loc.pack not in drop_packs:
                        out.write(_record(loc))
                        count += 1
                out.seek(0)
                out.write(HEADER.pack(MAGIC, count))
                out.flush()
                os.fsync(out.fileno())
            final = self.directory / f"{uuid.uuid4().hex}.idx"
            os.replace(tmp, final)
            fsync_dir(self.directory)
            for path in old:
                self.files.pop(path).close()
                path.unlink(missing_ok=True)
            fsync_dir(self.directory)
            if count:
                self.files[final] = _IndexFile(final)
            else:
                final.unlink()

    def maybe_compact(self) -> None:
        if len(self.files) > COMPACT_AT:
            self.rewrite()
