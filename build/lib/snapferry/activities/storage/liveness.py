"""Progress from deep inside a blocking step, for the activity that heartbeats it.

A backup's stall guard stops heartbeating when nothing moves for most of a heartbeat
timeout. Some long steps move without producing a checkpoint: a reader skipping forward in a
stream on resume, the wait for a stale attempt's lock. They call :func:`alive`, which reaches
the callback the running activity installed for its own thread with :func:`reporting_to`
(a no-op anywhere else, so readers stay usable without an activity).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

_local = threading.local()


@contextlib.contextmanager
def reporting_to(callback: Callable[[], None]) -> Iterator[None]:
    """Route :func:`alive` calls made on this thread to ``callback`` while the block runs."""
    previous = getattr(_local, "callback", None)
    _local.callback = callback
    try:
        yield
    finally:
        _local.callback = previous


def alive() -> None:
    """Tell whoever heartbeats this thread's step that it is still moving. The callback may
    raise (a stop was asked for): that stops the step where it stands."""
    callback = getattr(_local, "callback", None)
    if callback is not None:
        callback()
