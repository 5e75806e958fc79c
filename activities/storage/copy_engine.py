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
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from ..errors import BackupCancelled, BackupCorrupt
from . import checksum
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
        fd = os.open(target.data, os.O_WRONLY | os.O_CREAT, 0o640)
        digests = open(target.digests, "a+" if start.chunks_done else "w")  # noqa: SIM115
        try:
            os.ftruncate(fd, min(resumed_from, size))
            if start.chunks_done:
                digests.seek(0)
                kept = digests.read().splitlines()[: start.chunks_done]
                digests.seek(0)
                digests.truncate()
                digests.write("".join(d + "\n" for d in kept))
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
        csize = self.chunk_size
        buf = bytearray(csize)
        view = memoryview(buf)
        zeros = memoryview(bytes(csize))
        ends = [e.start + e.length for e in extents]
        idx = bisect.bisect_right(ends, start.chunks_done * csize)
        state = start.state
        copied = written = 0
        since_checkpoint = 0
        last_checkpoint = t0 = time.monotonic()

        for k in range(start.chunks_done, nchunks):
            if should_stop():
                raise BackupCancelled("backup cancelled")
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
                    os.pwrite(fd, view[:clen], cstart)
                    written += clen
            digests.write(digest + "\n")
            state = checksum.advance(state, digest)
            since_checkpoint += clen

            if self.rate_limit_bps:
                ahead = (copied / self.rate_limit_bps) - (time.monotonic() - t0)
                if ahead > 0:
                    self._sleep(ahead)

            now = time.monotonic()
            last = k == nchunks - 1
            if (
                last
                or since_checkpoint >= self.checkpoint_bytes
                or now - last_checkpoint >= self.checkpoint_seconds
            ):
                # The file ends exactly at the checkpoint (holes included), so that on resume
                # anything past it was written after the checkpoint and is cut off.
                os.ftruncate(fd, cend)
                os.fdatasync(fd)
                digests.flush()
                os.fsync(digests.fileno())
                cp = Checkpoint(
                    chunks_done=k + 1,
                    state=state,
                    chunk_size=csize,
                    bytes_copied_total=start.bytes_copied_total + copied,
                )
                on_checkpoint(cp, cend)
                since_checkpoint = 0
                last_checkpoint = now
        return state, copied, written


def verify_copy(data: Path, expected: str) -> None:
    """Re-read a written file and compare its chain checksum: the check before the rename."""
    chunk_size, _ = checksum.parse_checksum(expected)
    actual, _ = checksum.file_checksum(data, chunk_size)
    if actual != expected:
        raise BackupCorrupt(f"{data}: read back {actual}, expected {expected}")
