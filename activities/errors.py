"""Typed domain errors, and the one place where they become Temporal failures.

Each error says whether retrying can help. A bad input, a missing VM or a full store will not
get better by waiting, so they are non-retryable; transport and I/O trouble is retried with
backoff. Workflows build ``non_retryable_error_types`` from these classes' names, and
activities convert with :func:`as_application_error` at their boundary (the MAAS pattern).
"""

from __future__ import annotations

import errno
import functools
import inspect
from collections.abc import Callable
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from temporalio.exceptions import ApplicationError


class SnapferryError(Exception):
    """Base class. ``non_retryable`` is a class attribute so that it can be tabulated."""

    non_retryable = False


class InvalidInput(SnapferryError):
    non_retryable = True


class VmNotFound(SnapferryError):
    non_retryable = True


class DiskNotFound(SnapferryError):
    non_retryable = True


class UnsupportedImage(SnapferryError):
    """The snapshot's image uses a feature the copy engine cannot read (e.g. compression)."""

    non_retryable = True


class ImageUnreadable(SnapferryError):
    """qemu-img could not read an image now (I/O error, lock, file not there yet)."""


class QuiesceUnavailable(SnapferryError):
    """An application-consistent snapshot was asked for and the guest cannot be quiesced
    (no agent, an agent that does not answer, a hypervisor without the call): nothing was
    taken, and waiting does not make an agent appear."""

    non_retryable = True


class SecondaryStoreFull(SnapferryError):
    non_retryable = True


class SecondaryStoreUnavailable(SnapferryError):
    """The store cannot be written now (unmounted, read-only, permissions): may come back."""


class HypervisorUnavailable(SnapferryError):
    """The hypervisor could not be reached or refused for a transient reason."""


class BackupCorrupt(SnapferryError):
    """A verification read back different bytes than were written; a retry rewrites."""


class ChainBusy(SnapferryError):
    """A block job is already running on the disk; retrying later helps."""


class AlertSinkUnavailable(SnapferryError):
    """A webhook or mail relay did not take the alert; it is retried."""


class BackupCancelled(SnapferryError):
    """The workflow cancelled the copy; the ``.partial`` files were removed."""

    non_retryable = True


class BackupStalled(SnapferryError):
    """The copy made no progress for most of a heartbeat timeout (a hung store or source):
    it stopped at its last checkpoint and is retried from there. Not a cancel."""


class CredentialsRejected(SnapferryError):
    """The hypervisor manager refused our credentials: retrying cannot help."""

    non_retryable = True


class SourceGone(SnapferryError):
    """The snapshot's primary copy (or its datastore) is not there: an operator must act."""

    non_retryable = True


class PermissionDenied(SnapferryError):
    """The hypervisor manager's login lacks a privilege (named in the message): an operator
    must grant it, retrying cannot help."""

    non_retryable = True


class PrimaryStoreFull(SnapferryError):
    """Primary storage (a datastore) has no room for the snapshot's copy: permanent until an
    operator frees space, and each retry would copy the disk again first."""

    non_retryable = True


class SnapshotDeleted(SnapferryError):
    """A take run again (by a reset) for a snapshot that was deleted: not taken again."""

    non_retryable = True


ALL_ERRORS: tuple[type[SnapferryError], ...] = (
    InvalidInput,
    VmNotFound,
    DiskNotFound,
    UnsupportedImage,
    ImageUnreadable,
    SecondaryStoreFull,
    SecondaryStoreUnavailable,
    HypervisorUnavailable,
    BackupCorrupt,
    ChainBusy,
    AlertSinkUnavailable,
    BackupCancelled,
    BackupStalled,
    CredentialsRejected,
    SourceGone,
    SnapshotDeleted,
    PermissionDenied,
    PrimaryStoreFull,
    QuiesceUnavailable,
)

NON_RETRYABLE_ERROR_TYPES: list[str] = [c.__name__ for c in ALL_ERRORS if c.non_retryable]


def classify_os_error(exc: OSError, *, where: str) -> SnapferryError:
    """Map an OS error on the secondary store to a domain error."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SecondaryStoreFull(f"secondary store is full at {where}: {exc.strerror}")
    return SecondaryStoreUnavailable(f"secondary store not writable at {where}: {exc}")


def as_application_error(
    exc: SnapferryError, *, next_retry_delay: timedelta | None = None
) -> ApplicationError:
    """``next_retry_delay`` (retryable errors only) overrides the retry policy's interval:
    a backup's real failures wait CloudStack's ``backup.retry.interval`` while its policy's
    short interval serves crashes (heartbeat timeouts)."""
    return ApplicationError(
        str(exc),
        type=type(exc).__name__,
        non_retryable=exc.non_retryable,
        next_retry_delay=None if exc.non_retryable else next_retry_delay,
    )


P = ParamSpec("P")
R = TypeVar("R")


def converts_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate an activity so that domain errors leave it as typed ApplicationErrors."""

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except SnapferryError as exc:
                raise as_application_error(exc) from exc

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SnapferryError as exc:
            raise as_application_error(exc) from exc

    return wrapper  # type: ignore[return-value]
