"""A resumable whole-image checksum built from per-chunk SHA-256 digests.

Python's hashlib state cannot be saved, yet a backup must resume after a crash with its
checksum intact. So the whole-image checksum is a hash chain over fixed-size chunks, whose
state is 32 bytes, small enough to travel in every heartbeat, and which anyone can recompute
from the image alone (``snapferry backup verify`` does).

``sha256-runs`` (what backups are written with): ``H0 = sha256(TAG)``; each chunk whose data
is not all zeros, and a short last chunk, is ``Hi = sha256(H(i-1) || sha256(chunk i))``; each
maximal run of ``n`` whole chunks of zeros is *one* step, ``sha256(H || "Z" || n as 8 bytes
big-endian)`` (41 bytes against 64, so the two kinds of step never collide). A thin volume's
or a delta's empty tail of millions of chunks costs one step, not millions, so the checksum,
its resume and its verify cost in proportion to the data. Its state is the chain so far and
the zeros run still open (a checkpoint can fall inside one).

``sha256-chain`` (backups written before ``sha256-runs``; still verified): one step
``sha256(H(i-1) || sha256(chunk i))`` per chunk, zeros included.

The ``.chunks`` file holds one line per chunk, ``<digest>``, or one line per run of chunks
with the same digest, ``<digest>*<count>`` (how a run of zeros is recorded: one line).
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TextIO

RUNS = "sha256-runs"
CHAIN = "sha256-chain"
ALGORITHM = RUNS  # what new backups are written with
ALGORITHMS = (RUNS, CHAIN)
_TAGS = {RUNS: b"snapferry-sha256-runs-v1", CHAIN: b"snapferry-sha256-chain-v1"}


def initial_state(algorithm: str = CHAIN) -> str:
    return hashlib.sha256(_TAGS[algorithm]).hexdigest()


def chunk_digest(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=8)
def zero_digest(length: int) -> str:
    """Digest of a chunk of zeros: holes are hashed without reading or allocating them."""
    return hashlib.sha256(bytes(length)).hexdigest()


def advance(state: str, digest: str) -> str:
    return hashlib.sha256(bytes.fromhex(state) + bytes.fromhex(digest)).hexdigest()


def advance_zeros(state: str, count: int) -> str:
    """``sha256-runs``: the one step for a maximal run of ``count`` chunks of zeros."""
    return hashlib.sha256(bytes.fromhex(state) + b"Z" + count.to_bytes(8, "big")).hexdigest()


class Chain:
    """The running chain of either algorithm, fed digest by digest or run by run.

    For ``sha256-runs`` a run of whole zero chunks stays open (``run``) until a chunk with
    data closes it, so however the runs were split into lines or tasks, the chain is the
    same; :meth:`add_run` of zeros costs O(1). For ``sha256-chain`` every chunk is a step."""

    def __init__(
        self, algorithm: str, chunk_size: int, state: str | None = None, run: int = 0
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown checksum algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.chunk_size = chunk_size
        self.state = initial_state(algorithm) if state is None else state
        self.run = run
        self._zero = zero_digest(chunk_size)

    def add(self, digest: str) -> None:
        self.add_run(digest, 1)

    def add_run(self, digest: str, count: int) -> None:
        """``count`` chunks in a row whose digest is ``digest``."""
        if self.algorithm == RUNS and digest == self._zero:
            self.run += count
            return
        self._close_run()
        for _ in range(count):  # chunks with data: each was read, so this follows the data
            self.state = advance(self.state, digest)

    def _close_run(self) -> None:
        if self.run:
            self.state = advance_zeros(self.state, self.run)
            self.run = 0

    def final(self) -> str:
        """The checksum's state once every chunk was added (a pending run closed)."""
        if self.algorithm == RUNS and self.run:
            return advance_zeros(self.state, self.run)
        return self.state


def format_digest_line(digest: str, count: int = 1) -> str:
    return f"{digest}\n" if count == 1 else f"{digest}*{count}\n"


def parse_digest_line(line: str) -> tuple[str, int]:
    """``<digest>`` or ``<digest>*<count>``; ValueError for anything else."""
    digest, star, count = line.strip().partition("*")
    n = int(count) if star else 1
    if len(digest) != 64 or n < 1:
        raise ValueError(f"not a chunk digest line: {line.strip()[:80]!r}")
    bytes.fromhex(digest)
    return digest, n


def read_digest_lines(f: TextIO) -> Iterator[tuple[str, int]]:
    """The lines of a ``.chunks`` file, one at a time (memory stays flat)."""
    for line in f:
        if line.strip():
            yield parse_digest_line(line)


def format_checksum(state: str, chunk_size: int, algorithm: str = CHAIN) -> str:
    return f"{algorithm}:{chunk_size}:{state}"


def parse_checksum(checksum: str) -> tuple[int, str]:
    algorithm, chunk_size, state = checksum.split(":")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    return int(chunk_size), state


def checksum_algorithm(checksum: str) -> str:
    algorithm = checksum.split(":", 1)[0]
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    return algorithm


def data_segments(fd: int, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """The ranges of an open file that hold data, [a, b), found with SEEK_DATA/SEEK_HOLE: a
    hole reads as zeros without any I/O, so nothing needs to read it. A file system without
    hole support reports the whole file as data, which is slower but still right."""
    size = os.fstat(fd).st_size if end is None else end
    pos = start
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            raise
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield data, hole
        pos = hole


def _chunks_with_data(fd: int, size: int, chunk_size: int) -> Iterator[int]:
    """Indexes of the chunks that hold any data, ascending, each once."""
    last = -1
    for a, b in data_segments(fd, 0, size):
        for k in range(max(a // chunk_size, last + 1), (b - 1) // chunk_size + 1):
            last = k
            yield k


def _image_runs(
    fd: int, size: int, chunk_size: int, view: memoryview
) -> Iterator[tuple[str, int, int]]:
    """The file's chunk digests as ``(digest, count, bytes read)``: each chunk holding data
    read and hashed, the holes between them as runs of zero digests, never read."""
    nchunks = (size + chunk_size - 1) // chunk_size

    def holes(k: int, end: int) -> Iterator[tuple[str, int, int]]:
        short = end == nchunks and size % chunk_size != 0
        full_end = end - 1 if short else end
        if full_end > k:
            yield zero_digest(chunk_size), full_end - k, 0
        if short:
            yield zero_digest(size - (end - 1) * chunk_size), 1, 0

    k = 0
    for d in _chunks_with_data(fd, size, chunk_size):
        if d > k:
            yield from holes(k, d)
        clen = min(chunk_size, size - d * chunk_size)
        _pread_full(fd, view[:clen], d * chunk_size)
        yield chunk_digest(view[:clen]), 1, clen
        k = d + 1
    if k < nchunks:
        yield from holes(k, nchunks)


def file_checksum(
    path: str | os.PathLike[str], chunk_size: int, algorithm: str = ALGORITHM
) -> tuple[str, list[str]]:
    """Recompute the checksum of a finished file, and its ``.chunks`` lines (runs of zero
    chunks as one line). Holes are hashed as zeros without being read, so the cost follows
    the file's data, not its size."""
    chain = Chain(algorithm, chunk_size)
    lines: list[str] = []
    view = memoryview(bytearray(chunk_size))
    fd = os.open(path, os.O_RDONLY)
    try:
        for digest, count, _ in _image_runs(fd, os.fstat(fd).st_size, chunk_size, view):
            lines.append(format_digest_line(digest, count).rstrip("\n"))
            chain.add_run(digest, count)
    finally:
        os.close(fd)
    return format_checksum(chain.final(), chunk_size, algorithm), lines


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:  # the file is shorter than it said: the rest reads as missing
            raise EOFError(f"unexpected end of file at {offset + done}")
        done += n


@dataclass(frozen=True)
class VerifyReport:
    """What a verify did: the engine's own counters (a test reads ``bytes_read``)."""

    checksum: str
    chunks: int
    chunks_read: int
    bytes_read: int
    seconds: float
    cache_dropped: bool


class ChunkMismatch(Exception):
    """A chunk read back from the medium differs from its recorded digest, or the recorded
    digests do not chain to the expected checksum."""


def verify_file(
    path: str | os.PathLike[str],
    expected: str,
    *,
    digests_path: str | os.PathLike[str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    progress_every_s: float = 0.5,
) -> VerifyReport:
    """Check a finished image against its checksum, reading only its data, from the medium.

    - The file is fdatasynced, then its pages are dropped (``POSIX_FADV_DONTNEED``; they are
      clean after the sync, so they really go), so that every chunk read below comes from
      the disk (or the NFS server), not from what this host just wrote into its page cache.
    - With ``digests_path`` (the ``.chunks`` file) each data chunk is compared with its own
      recorded digest, and the chain over *all* recorded digests, zero digests included,
      must equal ``expected``. A chunk recorded as zero that SEEK_DATA/SEEK_HOLE shows as a
      hole needs no read; any chunk that holds data is read and checked, so a byte that
      appeared inside a hole region is caught. The file is walked line by line: a run of
      zero chunks is one line, so the walk follows the data, not the size.
    - Without it the digests are recomputed the same way (holes as zero digests).

    ``on_progress(bytes_verified, bytes_read)`` is called about every ``progress_every_s``
    (a long verify must heartbeat); it may raise to stop the verify.
    """
    chunk_size, _ = parse_checksum(expected)
    chain = Chain(checksum_algorithm(expected), chunk_size)
    t0 = time.monotonic()
    view = memoryview(bytearray(chunk_size))
    chunks_read = bytes_read = 0
    last_report = [t0]

    def tick(done_chunks: int) -> None:
        if on_progress is not None and time.monotonic() - last_report[0] >= progress_every_s:
            on_progress(min(done_chunks * chunk_size, size), bytes_read)
            last_report[0] = time.monotonic()

    fd = os.open(path, os.O_RDONLY)
    recorded = open(digests_path) if digests_path is not None else None  # noqa: SIM115
    try:
        size = os.fstat(fd).st_size
        nchunks = (size + chunk_size - 1) // chunk_size
        dropped = _drop_cache(fd)
        k = 0
        if recorded is None:
            for digest, count, nread in _image_runs(fd, size, chunk_size, view):
                chunks_read += 1 if nread else 0
                bytes_read += nread
                chain.add_run(digest, count)
                k += count
                tick(k)
        else:
            with_data = _chunks_with_data(fd, size, chunk_size)
            next_data = next(with_data, None)

            def check(j: int, want: str) -> None:
                """Read chunk ``j`` from the medium and compare it with ``want``."""
                nonlocal chunks_read, bytes_read
                clen = min(chunk_size, size - j * chunk_size)
                _pread_full(fd, view[:clen], j * chunk_size)
                chunks_read += 1
                bytes_read += clen
                got = chunk_digest(view[:clen])
                if got != want:
                    raise ChunkMismatch(
                        f"{path}: chunk {j} (offset {j * chunk_size}) reads back {got}, its"
                        f" recorded digest is {want}"
                    )

            try:
                lines = read_digest_lines(recorded)
                for want, count in lines:
                    end = k + count
                    if end > nchunks:
                        raise ChunkMismatch(
                            f"{digests_path}: more digests than the {nchunks} chunks"
                        )
                    clen = min(chunk_size, size - k * chunk_size)
                    if want in (zero_digest(chunk_size), zero_digest(clen)):
                        # Zeros: only the chunks that hold data on the medium are read.
                        while next_data is not None and next_data < end:
                            if next_data >= k:
                                last = min(chunk_size, size - next_data * chunk_size)
                                check(next_data, zero_digest(last))
                                tick(next_data)
                            next_data = next(with_data, None)
                    else:
                        for j in range(k, end):  # data: every chunk is read
                            check(j, want)
                            tick(j)
                        while next_data is not None and next_data < end:
                            next_data = next(with_data, None)
                    chain.add_run(want, count)
                    k = end
                    tick(k)
            except ValueError as exc:
                raise ChunkMismatch(f"{digests_path}: {exc}") from exc
            if k < nchunks:
                raise ChunkMismatch(f"{digests_path}: {k} digests for {nchunks} chunks")
        if dropped:
            _drop_cache(fd)  # leave the cache as we found it: a verify is not a reason to cache
    finally:
        os.close(fd)
        if recorded is not None:
            recorded.close()
    actual = format_checksum(chain.final(), chunk_size, chain.algorithm)
    if actual != expected:
        raise ChunkMismatch(f"{path}: read back {actual}, expected {expected}")
    if on_progress is not None:
        on_progress(size, bytes_read)
    return VerifyReport(
        checksum=actual,
        chunks=nchunks,
        chunks_read=chunks_read,
        bytes_read=bytes_read,
        seconds=time.monotonic() - t0,
        cache_dropped=dropped,
    )


def _drop_cache(fd: int) -> bool:
    """fdatasync, then drop the file's cached pages; False where the file system refuses."""
    try:
        os.fdatasync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        return False
    return True
