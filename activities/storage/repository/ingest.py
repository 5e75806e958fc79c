"""Copy a snapshot into the repository: the backup loop of the repository store.

The reader is read here, in order, one 4 MiB segment at a time (only the chunks its extents
touch: a thin volume's holes and a delta's unchanged ranges cost nothing); hashing, the index
lookup, zstd and AES-GCM run on a pool of threads (each releases the GIL while it works, so
the copy uses every core); the chunks are stored in order by this thread. A delta's chunk
that changed only in part is completed from its parent backup, so every backup stays whole.

Every pack is read back from the medium (its cached pages dropped) and each blob opened, on
a verify thread behind the copy, so the verify costs little more time than the copy. The
backup is published (its manifest written) only once every pack it wrote was verified.

Durability: a checkpoint (every ``checkpoint_bytes`` or ``checkpoint_seconds``) publishes
the open pack, adds it to the index, and records how many segments of the backup's index
are durable; a resumed attempt starts at the first segment not durable
(:class:`.backups.BackupWriter`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from pydantic import BaseModel

from ...errors import BackupCorrupt, SnapferryError
from .. import liveness
from ..reader import DataExtent, SnapshotReader, ZeroExtent
from .backups import BackupManifest, BackupReader, BackupWriter, PreparedChunk
from .blobs import ZERO_ID
from .packs import BlobLocation, pack_path, pack_table

# A checkpoint publishes the open pack and writes an index file: every 256 MiB read or
# 5 s, whichever comes first, bounds what a crash costs (it is read again) and keeps the
# index files and the packs they describe few and large.
CHECKPOINT_BYTES = 256 * 1024 * 1024
CHECKPOINT_SECONDS = 5.0
_IN_FLIGHT = 4  # segments handed to the pool and not yet stored (16 MiB): memory stays flat


class RepositoryCheckpoint(BaseModel):
    """What a repository backup heartbeats: where it is durable. The resume point itself
    is kept in the repository (the writer's checkpoint file), so a retry that lost its
    heartbeat details resumes all the same."""

    store: str = "repository"
    offset: int
    bytes_copied_total: int = 0


@dataclass(frozen=True)
class IngestOutcome:
    manifest: BackupManifest
    bytes_copied: int  # read from the source by this attempt
    resumed_from: int
    verify_bytes_read: int
    verify_seconds: float


class _PackVerifier:
    """Reads each published pack back from the medium on its own thread, behind the copy."""

    def __init__(self, writer: BackupWriter) -> None:
        self.repo = writer.repo
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repo-verify")
        self.pending: list[Future[int]] = []
        self.seconds = 0.0
        self._buffer = bytearray()

    def submit(self, blobs: list[BlobLocation]) -> None:
        self.pending.append(self.pool.submit(self._verify, blobs))

    def submit_pack(self, name: str) -> None:
        """A whole pack, from its own table: one an earlier attempt sealed."""

        def verify() -> int:
            try:
                blobs = pack_table(pack_path(self.repo.root, name), self.repo.codec)
            except FileNotFoundError:
                raise BackupCorrupt(f"pack {name} is missing") from None
            return self._verify(blobs)

        self.pending.append(self.pool.submit(verify))

    def _verify(self, blobs: list[BlobLocation]) -> int:
        if not blobs:
            return 0
        t0 = time.monotonic()
        path = pack_path(self.repo.root, blobs[0].pack)
        fd = os.open(path, os.O_RDONLY)
        read = 0
        try:
            with contextlib.suppress(OSError):  # fsynced: its pages are clean, dropped here
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            # One read of the whole run of blobs (a pack is about 32 MiB) into a buffer kept
            # from pack to pack (a new one each time costs its pages' zeroing), then each
            # blob opened.
            first = min(loc.offset for loc in blobs)
            end = max(loc.offset + loc.length for loc in blobs)
            if len(self._buffer) < end - first:
                self._buffer = bytearray(end - first)
            data = memoryview(self._buffer)[: end - first]
            read = 0
            while read < len(data):
                n = os.preadv(fd, [data[read:]], first + read)
                if n == 0:
                    break
                read += n
            if read < len(data):  # the buffer past it holds another pack's bytes
                raise BackupCorrupt(f"pack {blobs[0].pack} is truncated at {first + read}")
            for loc in blobs:
                stored = data[loc.offset - first : loc.offset - first + loc.length]
                self.repo.codec.decode(
                    loc.blob_id, stored, where=f"pack {loc.pack} offset {loc.offset}"
                )
        finally:
            os.close(fd)
        self.seconds += time.monotonic() - t0
        return read

    def wait(self) -> int:
        """Bytes read back; BackupCorrupt (naming the pack) if any blob did not open."""
        try:
            return sum(f.result() for f in self.pending)
        finally:
            self.pending.clear()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _segments(
    extents: Iterable[DataExtent], seg_bytes: int, size: int, start: int
) -> Iterator[tuple[int, list[tuple[DataExtent, int, int]]]]:
    """(segment offset, [(extent, lo, hi)]) for every segment the extents touch from
    ``start``, in order: the guest ranges to read (or to zero, for a ``ZeroExtent``)."""
    current = -1
    parts: list[tuple[DataExtent, int, int]] = []
    last = -1
    for e in extents:
        if e.start < last:
            raise ValueError(f"data extents out of order at {e.start}")
        last = e.start
        lo, end = max(e.start, start), min(e.start + e.length, size)
        while lo < end:
            s = lo // seg_bytes * seg_bytes
            hi = min(end, s + seg_bytes)
            if s != current:
                if parts:
                    yield current, parts
                current, parts = s, []
            parts.append((e, lo, hi))
            lo = hi
    if parts:
        yield current, parts


def _touched(parts: list[tuple[DataExtent, int, int]], seg: int, chunk: int) -> dict[int, int]:
    """Offsets (within the segment) of the chunks the parts touch, and the bytes they cover."""
    covered: dict[int, int] = {}
    for _, lo, hi in parts:
        pos = lo
        while pos < hi:
            c = (pos - seg) // chunk * chunk
            upto = min(hi, seg + c + chunk)
            covered[c] = covered.get(c, 0) + upto - pos
            pos = upto
    return covered


def ingest(
    reader: SnapshotReader,
    writer: BackupWriter,
    *,
    pool: ThreadPoolExecutor,
    delta: bool,
    extents: Iterable[DataExtent] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    stop_error: Callable[[], SnapferryError] | None = None,
    on_checkpoint: Callable[[RepositoryCheckpoint, int], None] = lambda _c, _d: None,
    on_progress: Callable[[int], None] = lambda _d: None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
    checkpoint_bytes: int = CHECKPOINT_BYTES,
    rate_limit_bps: float | None = None,
    publishing: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    sleep: Callable[[float], None] = time.sleep,
) -> IngestOutcome:
    """Store ``reader`` as the backup ``writer`` writes. ``delta``: its extents are what
    changed since the writer's parent (the rest is inherited); else they are all the data
    (the rest is zeros). The manifest is written inside ``publishing()``, after the last
    read and verify: a guard that may raise to publish nothing (the source checked again,
    under the volume's lock)."""
    chunk = writer.chunk
    size = writer.virtual_size
    resumed_from = writer.resume_offset
    parent = writer.parent if delta else None
    verifier = _PackVerifier(writer)
    writer.on_pack = verifier.submit
    for name in sorted(writer.resumed_packs):  # what the attempts before this one stored
        verifier.submit_pack(name)
    in_flight: collections.deque[tuple[int, Future[list[tuple[int, PreparedChunk]]]]] = (
        collections.deque()
    )
    copied = copied_at_checkpoint = 0
    last_checkpoint = t0 = time.monotonic()
    last_progress = 0.0
    on_checkpoint(RepositoryCheckpoint(offset=resumed_from), resumed_from)

    # Reused segment buffers: one per segment in flight, one being read.
    buffers = [bytearray(writer.seg_bytes) for _ in range(_IN_FLIGHT + 1)]
    zeros = bytes(chunk)

    def store_oldest() -> None:
        seg, fut = in_flight.popleft()
        for rel, prepared in fut.result():
            writer.put(seg + rel, prepared)

    try:
        todo = reader.data_extents() if extents is None else extents
        for n, (seg, parts) in enumerate(_segments(todo, writer.seg_bytes, size, resumed_from)):
            if should_stop():
                raise stop_error() if stop_error else SnapferryError("backup stopped")
            while len(in_flight) >= _IN_FLIGHT:
                store_oldest()  # which frees its buffer
            buf = buffers[n % len(buffers)]
            view = memoryview(buf)[: min(writer.seg_bytes, size - seg)]
            chunks = _touched(parts, seg, chunk)
            for rel, covered in chunks.items():
                clen = min(chunk, len(view) - rel)
                if covered < clen:  # what the extents do not cover: zeros, or the parent's
                    view[rel : rel + clen] = zeros[:clen]
                    if parent is not None:
                        _parent_chunk(parent, seg + rel, view[rel : rel + clen])
            for e, lo, hi in parts:
                if isinstance(e, ZeroExtent):
                    view[lo - seg : hi - seg] = bytes(hi - lo)
                else:
                    reader.read_range(e, lo, view[lo - seg : hi - seg])
                    copied += hi - lo
            in_flight.append((seg, pool.submit(_prepare, writer, view, sorted(chunks))))
            liveness.alive()
            now = time.monotonic()
            if rate_limit_bps:
                early = copied / rate_limit_bps - (now - t0)
                if early > 0:
                    sleep(early)
            if now - last_progress >= 0.5:
                on_progress(seg)
                last_progress = now
            if (
                now - last_checkpoint >= checkpoint_seconds
                or copied - copied_at_checkpoint >= checkpoint_bytes
            ):
                while in_flight:
                    store_oldest()
                done = writer.checkpoint()
                on_checkpoint(RepositoryCheckpoint(offset=done, bytes_copied_total=copied), done)
                last_checkpoint, copied_at_checkpoint = time.monotonic(), copied
        while in_flight:
            store_oldest()
        writer.finish_data()
        on_progress(size)
        verify_read = verifier.wait()  # every pack this backup wrote, from the medium
        with publishing():
            manifest = writer.commit()
    except BaseException:
        for _, fut in in_flight:
            fut.cancel()
        writer.abort()
        raise
    finally:
        verifier.close()
    return IngestOutcome(
        manifest=manifest,
        bytes_copied=copied,
        resumed_from=resumed_from,
        verify_bytes_read=verify_read,
        verify_seconds=verifier.seconds,
    )


def _prepare(
    writer: BackupWriter, view: memoryview, offsets: list[int]
) -> list[tuple[int, PreparedChunk]]:
    """One segment's touched chunks, prepared on a pool thread (one task per segment, so
    that handing work between threads costs little against the hashing)."""
    return [(rel, writer.prepare(bytes(view[rel : rel + writer.chunk]))) for rel in offsets]


def _parent_chunk(parent: BackupReader, offset: int, out: memoryview) -> None:
    """Fill ``out`` with the parent backup's chunk at ``offset`` (zeros where it has none):
    a delta's chunk that changed only in part keeps the rest of its bytes."""
    if offset >= parent.manifest.virtual_size:
        return
    c = offset // parent.chunk
    seg, j = divmod(c, parent.manifest.segment_chunks)
    ids = parent.chunk_ids(seg)
    if j >= len(ids) or ids[j] == ZERO_ID:
        return
    data = parent.repo.read_blob(ids[j], where=f"the parent backup at offset {offset}")
    n = min(len(out), len(data))
    out[:n] = data[:n]
