"""Why a copy stops before its end: an operator's cancel, or a stall the activity saw."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ...errors import BackupCancelled, BackupStalled, SnapferryError


class StopFlag:
    """Why a copy must stop: an operator's cancel (or a delete), or a stall the activity's
    guard saw. Callable like the plain ``should_stop`` it replaces; the engine raises
    :meth:`error`, so that a stall is retried and only a cancel is final."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._error: SnapferryError | None = None

    def cancel(self) -> None:
        with self._lock:
            if self._error is None:
                self._error = BackupCancelled("backup cancelled")

    def stall(self, seconds: float) -> None:
        with self._lock:
            if self._error is None:  # the first reason stays
                self._error = BackupStalled(
                    f"no progress for {seconds:.0f} s (a hung store or source?); the copy"
                    " stopped at its last checkpoint and is retried from there"
                )

    def __call__(self) -> bool:
        return self._error is not None

    def is_set(self) -> bool:
        return self._error is not None

    def error(self) -> SnapferryError:
        return self._error or BackupCancelled("backup cancelled")

    def raise_if_set(self) -> None:
        if self._error is not None:
            raise self._error


def stop_error(should_stop: Callable[[], bool]) -> SnapferryError:
    if isinstance(should_stop, StopFlag):
        return should_stop.error()
    owner = getattr(should_stop, "__self__", None)  # StopFlag.is_set passed as a bound method
    if isinstance(owner, StopFlag):
        return owner.error()
    return BackupCancelled("backup cancelled")
