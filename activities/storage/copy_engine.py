"""The copy loop, written once: chunking, sparse skipping, checksums, checkpoints, resume.

Vendors supply only a :class:`~activities.storage.reader.SnapshotReader`; this module owns
everything that must be right for every hypervisor (the Cinder ``ChunkedBackupDriver`` idea).

Durability contract: a checkpoint is reported only after the data and the chunk-digest file
up to its offset were fsynced, and the data file is cut to end exactly at that offset.
Resuming from a checkpoint truncates both files back to it, so bytes written after the last
checkpoint, including stale bytes over later holes, are never trusted.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from ..errors import BackupCancelled, BackupCorrupt
from . import checksum
from .files import FILE_MODE
from .reader import DataExtent, SnapshotReader


class Checkpoint(BaseModel):
    """What a backup heartbeats: enough to continue after any crash."""

    chunks_done: int
    state: str
    chunk_size: int
    bytes_copied_total: int = 0


@dataclass(frozen=True)
class CopyOutcome:
    checksum: str
    virtual_size: int
    bytes_copied: int
    bytes_written: int
    resumed_from: int
    chunks: int


@dataclass(frozen=True)
class CopyTarget:
    """The ``.partial`` data file and its digest list, finalized by the store later."""

    data: Path
    digests: Path


class CopyEngine:
    def __init__(
        self,
        *,
        chunk_size: int = 8 * 1024 * 1024,
        checkpoint_bytes: int = 128 * 1024 * 1024,
        checkpoint_seconds: float = 0.25,
        rate_limit_bps: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if chunk_size <= 0 or chunk_size % 4096:
            raise ValueError("chunk_size must be a positive multiple of 4096")
        self.chunk_size = chunk_size
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoint_seconds = checkpoint_seconds
        self.rate_limit_bps = rate_limit_bps
        self._sleep = sleep

    def _resume_point(self, target: CopyTarget, resume: Checkpoint | None) -> Checkpoint:
        """Trust a checkpoint only if its files still hold what it says; else start over."""
        fresh = Checkpoint(
            chunks_done=0, state=checksum.initial_state(), chunk_size=self.chunk_size
        )
        if resume is None or resume.chunk_size != self.chunk_size:
            return fresh
        if not (target.data.exists() and target.digests.exists()):
            return fresh
        lines = target.digests.read_text().splitlines()
        if len(lines) < resume.chunks_done:
            return fresh
        state = checksum.initial_state()
        for d in lines[: resume.chunks_done]:
            state = checksum.advance(state, d)
        if state != resume.state:
            return fresh
        return resume

    def copy(
        self,
        reader: SnapshotReader,
        target: CopyTarget,
        *,
        resume: Checkpoint | None = None,
        on_checkpoint: Callable[[Checkpoint, int], None] = lambda _c, _d: None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> CopyOutcome:
        """Copy ``reader`` into ``target``; ``on_checkpoint(cp, bytes_done)`` after each fsync.

        ``should_stop`` is polled once per chunk, so a cancel takes effect within one chunk.
        """
        size = reader.virtual_size
        csize = self.chunk_size
        nchunks = (size + csize - 1) // csize
        extents = reader.data_extents()
        start = self._resume_point(target, resume)
        resumed_from = start.chunks_done * csize

        target.data.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target.data, os.O_WRONLY | os.O_CREAT, FILE_MODE)
        try:
            digests = open(target.digests, "a+" if start.chunks_done else "w")  # noqa: SIM115
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, min(resumed_from, size))
            if start.chunks_done:
                digests.seek(0)
                kept = digests.read().splitlines()[: start.chunks_done]
                digests.seek(0)
                digests.truncate()
                digests.write("".join(d + "\n" for d in kept))
            # Report the start point actually accepted, so that a rejected checkpoint is
            # never heartbeated again.
            on_checkpoint(start, min(resumed_from, size))
            outcome = self._loop(
                reader, extents, fd, digests, start, nchunks, size, on_checkpoint, should_stop
            )
            os.ftruncate(fd, size)
            os.fsync(fd)
            digests.flush()
            os.fsync(digests.fileno())
        finally:
            os.close(fd)
            digests.close()
        return CopyOutcome(
            checksum=checksum.format_checksum(outcome[0], csize),
            virtual_size=size,
            bytes_copied=outcome[1],
            bytes_written=outcome[2],
            resumed_from=resumed_from,
            chunks=nchunks,
        )

    def _loop(
        self,
        reader: SnapshotReader,
        extents: list[DataExtent],
        fd: int,
        digests,  # type: ignore[no-untyped-def]
        start: Checkpoint,
        nchunks: int,
        size: int,
        on_checkpoint: Callable[[Checkpoint, int], None],
        should_stop: Callable[[], bool],
    ) -> tuple[str, int, int]:
        """Read and hash here; write on a writer thread; fsync and report on a sync thread.

        The three stages overlap (hashlib and file I/O release the GIL). The writer's FIFO
        order keeps the durability contract: a checkpoint is handed to the syncer only after
        every write before it was issued, and the syncer reports it only after an fdatasync
        that started later, while the writer goes on writing.
        """
        csize = self.chunk_size
        buffers = [bytearray(csize) for _ in range(_BUFFERS)]
        in_flight: list[Future[None] | None] = [None] * _BUFFERS
        zeros = memoryview(bytes(csize))
        ends = [e.start + e.length for e in extents]
        idx = bisect.bisect_right(ends, start.chunks_done * csize)
        state = start.state
        copied = written = 0
        since_checkpoint = 0
        last_checkpoint = t0 = time.monotonic()
        syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-sync")
        sink = _Writer(fd, digests, min(start.chunks_done * csize, size), on_checkpoint, syncer)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-writer") as pool:
            try:
                for k in range(start.chunks_done, nchunks):
                    if should_stop():
                        raise BackupCancelled("backup cancelled")
                    sink.raise_if_failed()  # a write or sync error stops the copy at once
                    slot = k % _BUFFERS
                    if (prev := in_flight[slot]) is not None:
                        prev.result()  # the buffer is free again; a write error surfaces here
                    view = memoryview(buffers[slot])
                    cstart = k * csize
                    clen = min(csize, size - cstart)
                    cend = cstart + clen
                    parts: list[tuple[DataExtent, int, int]] = []
                    while idx < len(extents) and extents[idx].start < cend:
                        e = extents[idx]
                        lo, hi = max(e.start, cstart), min(e.start + e.length, cend)
                        if hi > lo:
                            parts.append((e, lo, hi))
                        if e.start + e.length <= cend:
                            idx += 1
                        else:
                            break
                    data: memoryview | None = None
                    if not parts:
                        digest = checksum.zero_digest(clen)
                    else:
                        if sum(hi - lo for _, lo, hi in parts) < clen:
                            view[:clen] = zeros[:clen]
                        for e, lo, hi in parts:
                            reader.read_range(e, lo, view[lo - cstart : hi - cstart])
                            copied += hi - lo
                        digest = checksum.chunk_digest(view[:clen])
                        if digest != checksum.zero_digest(clen):
                            data = view[:clen]
                            written += clen
                    in_flight[slot] = pool.submit(sink.write, data, cstart, digest)
                    state = checksum.advance(state, digest)
                    since_checkpoint += clen

                    if self.rate_limit_bps:
                        ahead = (copied / self.rate_limit_bps) - (time.monotonic() - t0)
                        if ahead > 0:
                            self._sleep(ahead)

                    now = time.monotonic()
                    if (
                        k == nchunks - 1
                        or since_checkpoint >= self.checkpoint_bytes
                        or now - last_checkpoint >= self.checkpoint_seconds
                    ):
                        cp = Checkpoint(
                            chunks_done=k + 1,
                            state=state,
                            chunk_size=csize,
                            bytes_copied_total=start.bytes_copied_total + copied,
                        )
                        pool.submit(sink.checkpoint, cp, cend)
                        since_checkpoint = 0
                        last_checkpoint = now
            finally:
                pool.shutdown(wait=True)
                syncer.shutdown(wait=True)
            sink.raise_if_failed()
        return state, copied, written


_BUFFERS = 3


class _Writer:
    """The writer and sync stages. After a failure they drop later work, as a crash would."""

    def __init__(
        self,
        fd: int,
        digests,  # type: ignore[no-untyped-def]
        file_end: int,
        on_checkpoint: Callable[[Checkpoint, int], None],
        syncer: ThreadPoolExecutor,
    ) -> None:
        self.syncer = syncer
        self.fd = fd
        self.digests = digests
        self.file_end = file_end
        self.on_checkpoint = on_checkpoint
        self.error: BaseException | None = None

    def write(self, data: memoryview | None, offset: int, digest: str) -> None:
        if self.error:
            return
        try:
            if data is not None:
                os.pwrite(self.fd, data, offset)
                self.file_end = max(self.file_end, offset + len(data))
            self.digests.write(digest + "\n")
        except BaseException as exc:
            self.error = exc
            raise

    def checkpoint(self, cp: Checkpoint, end: int) -> None:
        if self.error:
            return
        try:
            # The file ends exactly at the checkpoint (holes included), so that on resume
            # anything past it was written after the checkpoint and is cut off. Only extend:
            # a no-op truncate still makes ext4 flush (auto_da_alloc).
            if self.file_end < end:
                os.ftruncate(self.fd, end)
                self.file_end = end
            self.digests.flush()
        except BaseException as exc:
            self.error = exc
            raise
        self.syncer.submit(self._sync_and_report, cp, end)

    def _sync_and_report(self, cp: Checkpoint, end: int) -> None:
        if self.error:
            return
        try:
            os.fdatasync(self.fd)
            os.fsync(self.digests.fileno())
            self.on_checkpoint(cp, end)
        except BaseException as exc:
            self.error = exc
            raise

    def raise_if_failed(self) -> None:
        if self.error:
            raise self.error


def verify_copy(data: Path, expected: str) -> None:
    """Re-read a written file and compare its chain checksum: the check before the rename."""
    chunk_size, _ = checksum.parse_checksum(expected)
    actual, _ = checksum.file_checksum(data, chunk_size)
    if actual != expected:
        raise BackupCorrupt(f"{data}: read back {actual}, expected {expected}")
