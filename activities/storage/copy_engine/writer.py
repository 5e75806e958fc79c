"""The copy's writer and sync stages: the chunk writes, the digest lines, writeback started
between checkpoints, and each checkpoint's fdatasync before it is reported."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .. import checksum
from .records import Checkpoint

_WRITEBACK_BYTES = 64 * 1024 * 1024  # writeback is started in batches this large
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, no wait


def _sync_file_range() -> Callable[[int, int, int, int], None] | None:
    """``sync_file_range(2)``: not in Python's ``os``, so glibc's through ctypes (which drops
    the GIL during the call); None where there is none (then checkpoints sync everything)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def call(fd: int, offset: int, length: int, flags: int) -> None:
        if fn(fd, offset, length, flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return call


sync_file_range = _sync_file_range()


class Writer:
    """The writer and sync stages. After a failure they drop later work, as a crash would."""

    def __init__(
        self,
        fd: int,
        digests,  # type: ignore[no-untyped-def]
        file_end: int,
        on_checkpoint: Callable[[Checkpoint, int], None],
        syncer: ThreadPoolExecutor,
        *,
        writeback: bool = True,
    ) -> None:
        self.syncer = syncer
        self.fd = fd
        self.digests = digests
        self.file_end = file_end
        self.on_checkpoint = on_checkpoint
        self.writeback = writeback and sync_file_range is not None
        self.error: BaseException | None = None
        # Checkpoints asked for (the read loop counts) and reported (the sync stage counts):
        # each counter has one writer, so no lock is needed.
        self.submitted = 0
        self.reported = 0
        self._wb_lo = self._wb_hi = file_end  # written, writeback not yet started

    def unreported(self) -> int:
        return self.submitted - self.reported

    def _written(self, offset: int, length: int) -> None:
        """Collect written ranges; every ``_WRITEBACK_BYTES`` hand the batch to the sync
        stage, which starts its writeback (it is idle between checkpoints, and the writer
        must not block on the block layer's queue)."""
        if self._wb_hi == offset:
            self._wb_hi += length
        else:
            if self._wb_hi > self._wb_lo:
                self.syncer.submit(self._start_writeback, self._wb_lo, self._wb_hi)
            self._wb_lo, self._wb_hi = offset, offset + length
        if self._wb_hi - self._wb_lo >= _WRITEBACK_BYTES:
            self.syncer.submit(self._start_writeback, self._wb_lo, self._wb_hi)
            self._wb_lo = self._wb_hi

    def _start_writeback(self, lo: int, hi: int) -> None:
        """Start writing ``[lo, hi)`` to the medium now, without waiting for it, so that
        dirty pages never pile up for the next fdatasync. Only a hint: a file system that
        refuses it (EINVAL, ESPIPE) is simply synced at the checkpoint."""
        if self.error or not self.writeback or sync_file_range is None:
            return
        try:
            sync_file_range(self.fd, lo, hi - lo, SYNC_FILE_RANGE_WRITE)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
                self.error = exc  # a real write error: the copy stops, as at a sync
                raise
            self.writeback = False

    def write(
        self,
        data: memoryview | None,
        offset: int,
        digest: str,
        spans: list[tuple[int, int]] | None = None,
    ) -> None:
        """Write the chunk's ``spans`` (offsets within ``data``; all of it when None) at
        ``offset``, and its digest; ``data`` None is a hole."""
        if self.error:
            return
        try:
            if data is not None:
                for lo, hi in [(0, len(data))] if spans is None else spans:
                    done = lo
                    while done < hi:  # a short write (NFS, a signal) goes on, not lost
                        done += os.pwrite(self.fd, data[done:hi], offset + done)
                    if self.writeback:
                        self._written(offset + lo, hi - lo)
                    # Where the file really ends: a checkpoint extends it to its end, so
                    # that nothing a crash appends later can pass for checkpointed bytes.
                    self.file_end = max(self.file_end, offset + hi)
            self.digests.write(checksum.format_digest_line(digest))
        except BaseException as exc:
            self.error = exc
            raise

    def write_holes(self, digest: str, count: int) -> None:
        """The digests of ``count`` chunks that stay holes (nothing to write): one line."""
        if self.error:
            return
        try:
            self.digests.write(checksum.format_digest_line(digest, count))
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
            self.reported += 1
        except BaseException as exc:
            self.error = exc
            raise

    def raise_if_failed(self) -> None:
        if self.error:
            raise self.error
