"""The copy loop: chunking, sparse skipping, checksums, checkpoints, resume (the package's
docstring states its durability contract and what checkpoints cost)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from .. import checksum, liveness
from ..files import FILE_MODE
from ..reader import DataExtent, SnapshotReader, ZeroExtent
from .records import Checkpoint, CopyOutcome, CopyTarget
from .stop import stop_error
from .writer import Writer

# Checkpoint rate (see the package docstring). Every checkpoint costs an fdatasync of the data
# and of the digest list; with writeback started chunk by chunk that sync is short, and
# ``make bench`` shows the cost against a copy with none. The time bound is what a crash can
# cost (it is copied again) and what the stall guard waits between two reports.
CHECKPOINT_BYTES = 1024 * 1024 * 1024
CHECKPOINT_SECONDS = 1.0


class CopyEngine:
    def __init__(
        self,
        *,
        chunk_size: int = 8 * 1024 * 1024,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        rate_limit_bps: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        writeback: bool = True,
    ) -> None:
        """``checkpoint_bytes`` counts data copied (holes cost no sync, the time bound
        covers them); ``writeback`` starts each written chunk's writeback at once."""
        if chunk_size <= 0 or chunk_size % 4096:
            raise ValueError("chunk_size must be a positive multiple of 4096")
        self.chunk_size = chunk_size
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoint_seconds = checkpoint_seconds
        self.rate_limit_bps = rate_limit_bps
        self.writeback = writeback
        self._sleep = sleep

    def with_chunk_size(self, chunk_size: int) -> CopyEngine:
        """The same engine, copying in chunks of another size."""
        return self._with(chunk_size, self.rate_limit_bps)

    def with_rate_limit(self, rate_limit_bps: float | None) -> CopyEngine:
        """The same engine, at another rate limit (None: none)."""
        return self._with(self.chunk_size, rate_limit_bps)

    def _with(self, chunk_size: int, rate_limit_bps: float | None) -> CopyEngine:
        return CopyEngine(
            chunk_size=chunk_size,
            checkpoint_bytes=self.checkpoint_bytes,
            checkpoint_seconds=self.checkpoint_seconds,
            rate_limit_bps=rate_limit_bps,
            sleep=self._sleep,
            writeback=self.writeback,
        )

    def _resume_point(
        self, target: CopyTarget, resume: Checkpoint | None
    ) -> tuple[Checkpoint, int]:
        """Trust a checkpoint only if its files still hold what it says; else start over.
        Returns it and the byte length of its digest lines (read one at a time: memory
        stays flat however many chunks the volume has; a run of zero chunks is one line,
        so the walk follows the data). It heartbeats (:func:`~.liveness.alive`) as it goes:
        a late checkpoint of a large delta has many lines."""
        fresh = Checkpoint(
            chunks_done=0,
            state=checksum.initial_state(checksum.ALGORITHM),
            chunk_size=self.chunk_size,
            algorithm=checksum.ALGORITHM,
        )
        if resume is None or resume.chunk_size != self.chunk_size:
            return fresh, 0
        if resume.algorithm != checksum.ALGORITHM:
            return fresh, 0
        if not (target.data.exists() and target.digests.exists()):
            return fresh, 0
        chain = checksum.Chain(checksum.ALGORITHM, self.chunk_size)
        kept = done = lines = 0
        with open(target.digests, "rb") as f:
            while done < resume.chunks_done:
                line = f.readline()
                if not line.endswith(b"\n"):
                    return fresh, 0  # fewer digests than the checkpoint says
                try:
                    digest, count = checksum.parse_digest_line(line.decode())
                except ValueError:
                    return fresh, 0
                chain.add_run(digest, count)
                done += count
                kept += len(line)
                lines += 1
                if lines % _ALIVE_EVERY_LINES == 0:
                    liveness.alive()
        if done != resume.chunks_done or (chain.state, chain.run) != (
            resume.state,
            resume.zero_run,
        ):
            return fresh, 0
        return resume, kept

    def copy(
        self,
        reader: SnapshotReader,
        target: CopyTarget,
        *,
        resume: Checkpoint | None = None,
        on_checkpoint: Callable[[Checkpoint, int], None] = lambda _c, _d: None,
        should_stop: Callable[[], bool] = lambda: False,
        extents: Iterable[DataExtent] | None = None,
    ) -> CopyOutcome:
        """Copy ``reader`` into ``target``; ``on_checkpoint(cp, bytes_done)`` after each fsync.

        ``should_stop`` is polled once per chunk, so a cancel takes effect within one chunk.
        ``extents``: the reader's data extents when the caller already listed them (a
        delta's, kept for its manifest), so that the image is not mapped a second time.
        """
        size = reader.virtual_size
        csize = self.chunk_size
        nchunks = (size + csize - 1) // csize
        start, kept_bytes = self._resume_point(target, resume)
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
                digests.truncate(kept_bytes)  # "a+": later writes go to the new end
            # Report the start point actually accepted, so that a rejected checkpoint is
            # never heartbeated again.
            on_checkpoint(start, min(resumed_from, size))
            # Streamed (a reader may map its image window by window): memory stays flat
            # in the virtual size. Extents wholly before the resume point are dropped.
            todo = _extents_from(
                reader.data_extents() if extents is None else extents, resumed_from
            )
            outcome = self._loop(
                reader, todo, fd, digests, start, nchunks, size, on_checkpoint, should_stop
            )
            os.ftruncate(fd, size)
            os.fsync(fd)
            digests.flush()
            os.fsync(digests.fileno())
        finally:
            os.close(fd)
            digests.close()
        return CopyOutcome(
            checksum=checksum.format_checksum(outcome[0], csize, checksum.ALGORITHM),
            virtual_size=size,
            bytes_copied=outcome[1],
            bytes_written=outcome[2],
            resumed_from=resumed_from,
            chunks=nchunks,
        )

    def _loop(
        self,
        reader: SnapshotReader,
        extents: Iterator[DataExtent],
        fd: int,
        digests,  # type: ignore[no-untyped-def]
        start: Checkpoint,
        nchunks: int,
        size: int,
        on_checkpoint: Callable[[Checkpoint, int], None],
        should_stop: Callable[[], bool],
    ) -> tuple[str, int, int]:
        """Read here; hash on a hasher thread; write on a writer thread; fsync and report on
        a sync thread.

        The four stages overlap (preadv, hashlib and pwrite release the GIL), so reading the
        next chunks goes on while one is hashed and another written. Each stage is a single
        thread fed in order, so FIFO order keeps the durability contract: a checkpoint is
        built by the hasher after every chunk before it was hashed, handed to the writer
        after their writes, to the syncer after those were issued, and reported only after
        an fdatasync that started later, while the other stages go on. Between checkpoints
        the syncer also starts the writeback of each 64 MiB written (``sync_file_range``),
        so the next fdatasync has little left to wait for.
        """
        csize = self.chunk_size
        buffers = [bytearray(csize) for _ in range(_BUFFERS)]
        in_flight: list[Future[Future[None]] | None] = [None] * _BUFFERS
        zeros = memoryview(bytes(csize))
        pending: DataExtent | None = next(extents, None)
        chain = _Chain(checksum.Chain(checksum.ALGORITHM, csize, start.state, start.zero_run))
        copied = 0
        since_checkpoint = 0
        last_checkpoint = t0 = time.monotonic()
        syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-sync")
        sink = Writer(
            fd,
            digests,
            min(start.chunks_done * csize, size),
            on_checkpoint,
            syncer,
            writeback=self.writeback,
        )
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-writer")
        hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-hash")

        def hash_chunk(
            data: memoryview | None, cstart: int, clen: int, spans: list[tuple[int, int]]
        ) -> Future[None]:
            if data is None:
                digest = checksum.zero_digest(clen)
            else:
                digest = checksum.chunk_digest(data)
                if digest == checksum.zero_digest(clen) or not spans:
                    data = None  # all zeros after all: it stays a hole
                else:
                    chain.written += sum(hi - lo for lo, hi in spans)
            chain.chain.add(digest)
            return pool.submit(sink.write, data, cstart, digest, spans)

        def hash_holes(count: int) -> None:
            """``count`` whole chunks with no data, in one task: a thin volume or a delta
            is mostly such chunks, and one task each would cost more than its data. O(1)
            whatever ``count``: one chain step and one ``.chunks`` line for the run."""
            digest = checksum.zero_digest(csize)
            chain.chain.add_run(digest, count)
            pool.submit(sink.write_holes, digest, count)

        holes = 0  # whole chunks with no data since the last task handed to the hasher

        def flush_holes() -> None:
            nonlocal holes
            if holes:
                hasher.submit(hash_holes, holes)
                holes = 0

        def checkpoint(chunks_done: int, end: int, copied_total: int) -> None:
            cp = Checkpoint(
                chunks_done=chunks_done,
                state=chain.chain.state,
                chunk_size=csize,
                bytes_copied_total=copied_total,
                algorithm=chain.chain.algorithm,
                zero_run=chain.chain.run,
            )
            pool.submit(sink.checkpoint, cp, end)

        try:
            k = start.chunks_done - 1
            while (k := k + 1) < nchunks:
                if should_stop():
                    raise stop_error(should_stop)
                sink.raise_if_failed()  # a write or sync error stops the copy at once
                if pending is None or pending.start >= (k + 1) * csize:
                    # No data before the chunk that holds the next extent: skip the holes in
                    # one step (a thin volume's or a delta's gaps cost nothing per chunk).
                    # The last chunk, which may be short, is always handled below.
                    ahead = nchunks - 1 if pending is None else pending.start // csize
                    if (ahead := min(ahead, nchunks - 1)) > k:
                        holes += ahead - k
                        k = ahead - 1
                        now = time.monotonic()
                        if now - last_checkpoint >= self.checkpoint_seconds:
                            flush_holes()
                            sink.submitted += 1
                            hasher.submit(
                                checkpoint, ahead, ahead * csize, start.bytes_copied_total + copied
                            )
                            last_checkpoint = now
                        if sink.unreported() <= 1:
                            liveness.alive()
                        continue
                slot = k % _BUFFERS
                if (prev := in_flight[slot]) is not None:
                    prev.result().result()  # the buffer is free again; errors surface here
                    in_flight[slot] = None
                if sink.unreported() <= 1:
                    # Every stage moved and the syncs keep up: tell the activity's stall
                    # guard between checkpoints (seconds apart). When a sync lags a whole
                    # checkpoint behind, only its reports count, so a hung flush still
                    # shows as a stall.
                    liveness.alive()
                view = memoryview(buffers[slot])
                cstart = k * csize
                clen = min(csize, size - cstart)
                cend = cstart + clen
                parts: list[tuple[DataExtent, int, int]] = []
                while pending is not None and pending.start < cend:
                    e = pending
                    lo, hi = max(e.start, cstart), min(e.start + e.length, cend)
                    if hi > lo:
                        parts.append((e, lo, hi))
                    if e.start + e.length <= cend:
                        pending = next(extents, None)
                    else:
                        break
                if not parts and clen == csize and k < nchunks - 1:
                    holes += 1
                else:
                    flush_holes()
                data: memoryview | None = None
                # Only the extents' own bytes are written (the file is a hole everywhere
                # else, truncated at the resume point), and a range known to be zeros (a
                # delta's write of zeros) not even that: a chunk that holds one 64 KiB
                # change of a delta costs 64 KiB on secondary, not the chunk.
                spans: list[tuple[int, int]] = []
                if parts:
                    in_data = sum(hi - lo for _, lo, hi in parts)
                    if in_data < clen:
                        view[:clen] = zeros[:clen]
                    for e, lo, hi in parts:
                        reader.read_range(e, lo, view[lo - cstart : hi - cstart])
                        if not isinstance(e, ZeroExtent):
                            spans.append((lo - cstart, hi - cstart))
                    copied += in_data
                    since_checkpoint += in_data
                    data = view[:clen]
                if not holes:
                    in_flight[slot] = hasher.submit(hash_chunk, data, cstart, clen, spans)

                if self.rate_limit_bps:
                    early = (copied / self.rate_limit_bps) - (time.monotonic() - t0)
                    if early > 0:
                        self._sleep(early)

                now = time.monotonic()
                if (
                    k == nchunks - 1
                    or since_checkpoint >= self.checkpoint_bytes
                    or now - last_checkpoint >= self.checkpoint_seconds
                ):
                    flush_holes()
                    sink.submitted += 1
                    hasher.submit(checkpoint, k + 1, cend, start.bytes_copied_total + copied)
                    since_checkpoint = 0
                    last_checkpoint = now
        finally:
            # In stage order, each draining into the next: nothing is left half-submitted.
            hasher.shutdown(wait=True)
            pool.shutdown(wait=True)
            syncer.shutdown(wait=True)
        for fut in in_flight:  # a hasher error not yet seen by the loop
            if fut is not None:
                fut.result().result()
        sink.raise_if_failed()
        return chain.chain.final(), copied, chain.written


class _Chain:
    """The hasher stage's running state: the chain so far and the bytes it found data in."""

    def __init__(self, chain: checksum.Chain) -> None:
        self.chain = chain
        self.written = 0


_ALIVE_EVERY_LINES = 4096  # a resume's walk of the digest lines heartbeats this often


_BUFFERS = 8  # chunks in flight between the stages (8 x 8 MiB: memory stays flat)


def _extents_from(extents: Iterable[DataExtent], offset: int) -> Iterator[DataExtent]:
    """The reader's extents from ``offset`` on, lazily, checked to be sorted."""
    last = -1
    for e in extents:
        if e.start < last:
            raise ValueError(f"data extents out of order at {e.start}")
        last = e.start
        if e.start + e.length > offset and e.length > 0:
            yield e
