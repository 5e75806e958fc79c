"""Copy a snapshot into the repository: the backup loop of the repository store.

The reader is read here, in order, one 64 KiB chunk at a time (only the chunks its extents
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
from .packs import BlobLocation, pack_path

# A checkpoint publishes the open pack and writes an index file: every 256 MiB read or
# 5 s, whichever comes first, bounds what a crash costs (it is read again) and keeps the
# index files and the packs they describe few and large.
CHECKPOINT_BYTES = 256 * 1024 * 1024
CHECKPOINT_SECONDS = 5.0
_IN_FLIGHT = 64  # chunks handed to the pool and not yet stored (4 MiB): memory stays flat


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

    def submit(self, blobs: list[BlobLocation]) -> None:
        self.pending.append(self.pool.submit(self._verify, blobs))

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
            for loc in blobs:
                stored = os.pread(fd, loc.length, loc.offset)
                read += len(stored)
                if len(stored) != loc.length:
                    raise BackupCorrupt(f"pack {loc.pack} is truncated at {loc.offset}")
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


def _chunks(
    extents: Iterable[DataExtent], chunk: int, size: int, start: int
) -> Iterator[tuple[int, list[tuple[DataExtent, int, int]]]]:
    """(chunk offset, [(extent, lo, hi)]) for every chunk the extents touch from ``start``,
    in order: the guest ranges of each chunk to read (or to zero, for a ``ZeroExtent``)."""
    current = -1
    parts: list[tuple[DataExtent, int, int]] = []
    last = -1
    for e in extents:
        if e.start < last:
            raise ValueError(f"data extents out of order at {e.start}")
        last = e.start
        lo, end = max(e.start, start), min(e.start + e.length, size)
        while lo < end:
            c = lo // chunk * chunk
            hi = min(end, c + chunk)
            if c != current:
                if parts:
                    yield current, parts
                current, parts = c, []
            parts.append((e, lo, hi))
            lo = hi
    if parts:
        yield current, parts


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
    in_flight: collections.deque[tuple[int, Future[PreparedChunk]]] = collections.deque()
    copied = copied_at_checkpoint = 0
    last_checkpoint = t0 = time.monotonic()
    last_progress = 0.0
    on_checkpoint(RepositoryCheckpoint(offset=resumed_from), resumed_from)

    def store_oldest() -> None:
        offset, fut = in_flight.popleft()
        writer.put(offset, fut.result())

    try:
        todo = reader.data_extents() if extents is None else extents
        for n, (offset, parts) in enumerate(_chunks(todo, chunk, size, resumed_from)):
            if should_stop():
                raise stop_error() if stop_error else SnapferryError("backup stopped")
            clen = min(chunk, size - offset)
            buf = _base_chunk(parent, offset, clen)
            view = memoryview(buf)
            for e, lo, hi in parts:
                if isinstance(e, ZeroExtent):
                    view[lo - offset : hi - offset] = bytes(hi - lo)
                else:
                    reader.read_range(e, lo, view[lo - offset : hi - offset])
                    copied += hi - lo
            while len(in_flight) >= _IN_FLIGHT:
                store_oldest()
            in_flight.append((offset, pool.submit(writer.prepare, bytes(buf))))
            if n % 64 == 0:
                liveness.alive()
            now = time.monotonic()
            if rate_limit_bps:
                early = copied / rate_limit_bps - (now - t0)
                if early > 0:
                    sleep(early)
            if now - last_progress >= 0.5:
                on_progress(offset)
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


def _base_chunk(parent: BackupReader | None, offset: int, length: int) -> bytearray:
    """What a chunk holds before this backup's changes: zeros for a full backup, the
    parent's bytes for a delta (whose changes may cover only part of the chunk)."""
    if parent is None or offset >= parent.manifest.virtual_size:
        return bytearray(length)
    c = offset // parent.chunk
    seg, j = divmod(c, parent.manifest.segment_chunks)
    ids = parent.chunk_ids(seg)
    if j >= len(ids) or ids[j] == ZERO_ID:
        return bytearray(length)
    data = parent.repo.read_blob(ids[j], where=f"the parent backup at offset {offset}")
    out = bytearray(length)
    n = min(length, len(data))
    out[:n] = data[:n]
    return out
