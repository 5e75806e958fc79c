"""nbdkit's Python plugin serving one backup read-only (see :mod:`.nbd_export`).

nbdkit loads this file as its ``__main__`` in its embedded Python; ``pythonpath=`` gives the
import path of the snapferry that started it, ``manifest=`` the backup's manifest. Every
connection reads the same disk, which never changes, so clients may open several
(``can_multi_conn``); requests are served one at a time (the readers keep small caches).
"""

from __future__ import annotations

import errno
import os
import site
import sys
from typing import Any

import nbdkit  # type: ignore[import-not-found]

API_VERSION = 2

_config: dict[str, str] = {}
_disk: Any = None


def config(key: str, value: str) -> None:
    if key not in ("manifest", "pythonpath"):
        raise ValueError(f"unknown parameter {key!r}")
    _config[key] = value


def config_complete() -> None:
    if "manifest" not in _config:
        raise ValueError("manifest= is required")
    paths = [p for p in _config.get("pythonpath", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    for p in paths:
        site.addsitedir(p)  # its .pth files: an editable install's finder


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS)


def get_ready() -> None:
    global _disk
    from snapferry.activities.storage.nbd_export import open_disk

    _disk = open_disk(_config["manifest"])


def open(readonly: bool) -> int:  # noqa: A001 - nbdkit calls it by this name
    return 1


def get_size(h: int) -> int:
    return int(_disk.size)


def can_write(h: int) -> bool:
    return False


def can_multi_conn(h: int) -> bool:
    return True


def can_extents(h: int) -> bool:
    return True


def extents(h: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    zero = int(nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    # Bounded work per request: the client asks again from where the answer ends.
    runs = _disk.extents(offset, min(count, 1 << 30))
    if flags & nbdkit.FLAG_REQ_ONE:
        runs = runs[:1]
    return [(start, length, zero if is_zero else 0) for start, length, is_zero in runs]


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    try:
        buf[:] = _disk.read(offset, len(buf))
    except Exception as err:
        nbdkit.debug(f"snapferry: read of {len(buf)} at {offset} failed: {err}")
        nbdkit.set_error(errno.EIO)
        raise
