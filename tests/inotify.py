"""Watch files for opens with Linux inotify (ctypes, no extra package).

The proof that snapferry never *opens* a file a guest named in a forged image header: not
just that the file's bytes are absent from a backup, but that no process on the machine
(qemu-img, the copy engine) opened it while the watch was on. See inotify(7): ``IN_OPEN``
fires for every open(2) of a watched file, by any process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import struct
from collections.abc import Iterator
from pathlib import Path

IN_OPEN = 0x00000020
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class OpenWatch:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.opens = 0

    def drain(self) -> int:
        """Count the opens seen so far."""
        while select.select([self._fd], [], [], 0)[0]:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            pos = 0
            while pos < len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                if mask & IN_OPEN:
                    self.opens += 1
                pos += _EVENT.size + length
        return self.opens


@contextlib.contextmanager
def watch_opens(*paths: Path) -> Iterator[OpenWatch]:
    fd = _libc.inotify_init1(IN_NONBLOCK)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    try:
        for path in paths:
            if _libc.inotify_add_watch(fd, os.fsencode(path), IN_OPEN) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        watch = OpenWatch(fd)
        yield watch
        watch.drain()
    finally:
        os.close(fd)
