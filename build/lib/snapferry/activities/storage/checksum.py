"""A resumable whole-image checksum built from per-chunk SHA-256 digests.

Python's hashlib state cannot be saved, yet a backup must resume after a crash with its
checksum intact. So the whole-image checksum is a hash chain over fixed-size chunks:
``H0 = sha256(TAG)``, ``Hi = sha256(H(i-1) || sha256(chunk i))``. Its state is 32 bytes,
small enough to travel in every heartbeat, and anyone can recompute it from the image alone
(``snapferry backup verify`` does).
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

ALGORITHM = "sha256-chain"
_TAG = b"snapferry-sha256-chain-v1"


def initial_state() -> str:
    return hashlib.sha256(_TAG).hexdigest()


def chunk_digest(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=8)
def zero_digest(length: int) -> str:
    """Digest of a chunk of zeros: holes are hashed without reading or allocating them."""
    return hashlib.sha256(bytes(length)).hexdigest()


def advance(state: str, digest: str) -> str:
    return hashlib.sha256(bytes.fromhex(state) + bytes.fromhex(digest)).hexdigest()


def format_checksum(state: str, chunk_size: int) -> str:
    return f"{ALGORITHM}:{chunk_size}:{state}"


def parse_checksum(checksum: str) -> tuple[int, str]:
    algorithm, chunk_size, state = checksum.split(":")
    if algorithm != ALGORITHM:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    return int(chunk_size), state


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


def file_checksum(path: str | os.PathLike[str], chunk_size: int) -> tuple[str, list[str]]:
    """Recompute the chain and the chunk digests of a finished file. Holes are hashed as
    zeros without being read, so the cost follows the file's data, not its size."""
    state = initial_state()
    digests: list[str] = []
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        with_data = _chunks_with_data(fd, size, chunk_size)
        next_data = next(with_data, None)
        for k in range((size + chunk_size - 1) // chunk_size):
            clen = min(chunk_size, size - k * chunk_size)
            if k == next_data:
                _pread_full(fd, view[:clen], k * chunk_size)
                d = chunk_digest(view[:clen])
                next_data = next(with_data, None)
            else:
                d = zero_digest(clen)
            digests.append(d)
            state = advance(state, d)
    finally:
        os.close(fd)
    return format_checksum(state, chunk_size), digests


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
    """Check a finished image against its chain checksum, reading only its data, from the
    medium.

    - The file is fdatasynced, then its pages are dropped (``POSIX_FADV_DONTNEED``; they are
      clean after the sync, so they really go), so that every chunk read below comes from
      the disk (or the NFS server), not from what this host just wrote into its page cache.
    - With ``digests_path`` (the ``.chunks`` file) each data chunk is compared with its own
      recorded digest, and the chain over *all* recorded digests, zero digests included,
      must equal ``expected``. A chunk recorded as zero that SEEK_DATA/SEEK_HOLE shows as a
      hole needs no read; any chunk that holds data is read and checked, so a byte that
      appeared inside a hole region is caught.
    - Without it the digests are recomputed the same way (holes as zero digests).

    ``on_progress(bytes_verified, bytes_read)`` is called about every ``progress_every_s``
    (a long verify must heartbeat); it may raise to stop the verify.
    """
    chunk_size, _ = parse_checksum(expected)
    t0 = time.monotonic()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    state = initial_state()
    chunks_read = bytes_read = 0
    last_report = t0
    fd = os.open(path, os.O_RDONLY)
    recorded = open(digests_path) if digests_path is not None else None  # noqa: SIM115
    try:
        size = os.fstat(fd).st_size
        nchunks = (size + chunk_size - 1) // chunk_size
        dropped = _drop_cache(fd)
        with_data = _chunks_with_data(fd, size, chunk_size)
        next_data = next(with_data, None)
        for k in range(nchunks):
            clen = min(chunk_size, size - k * chunk_size)
            want: str | None = None
            if recorded is not None:
                want = recorded.readline().strip()
                if not want:
                    raise ChunkMismatch(f"{digests_path}: {k} digests for {nchunks} chunks")
            if k == next_data or (want is not None and want != zero_digest(clen)):
                # Data on disk, or a digest that says data: read it from the medium.
                _pread_full(fd, view[:clen], k * chunk_size)
                chunks_read += 1
                bytes_read += clen
                got = chunk_digest(view[:clen])
                if k == next_data:
                    next_data = next(with_data, None)
            else:
                got = zero_digest(clen)
            if want is not None and got != want:
                raise ChunkMismatch(
                    f"{path}: chunk {k} (offset {k * chunk_size}) reads back {got}, its"
                    f" recorded digest is {want}"
                )
            state = advance(state, got)
            if on_progress is not None and time.monotonic() - last_report >= progress_every_s:
                on_progress(k * chunk_size + clen, bytes_read)
                last_report = time.monotonic()
        if recorded is not None and recorded.readline().strip():
            raise ChunkMismatch(f"{digests_path}: more digests than the {nchunks} chunks")
        if dropped:
            _drop_cache(fd)  # leave the cache as we found it: a verify is not a reason to cache
    finally:
        os.close(fd)
        if recorded is not None:
            recorded.close()
    actual = format_checksum(state, chunk_size)
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
