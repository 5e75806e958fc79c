"""What a take does with ``quiesce`` when the guest cannot be quiesced.

One rule for every hypervisor, so that a caller learns the same thing whichever runs the
VM: ``yes`` is refused before anything is taken (the reason says what was missing and how
to take the snapshot anyway), ``try`` goes on crash-consistent and the record says why,
``no`` is crash-consistent and says nothing.
"""

from __future__ import annotations

from ..contracts import Consistency, Quiesce
from ..errors import QuiesceUnavailable


def without_quiesce(quiesce: Quiesce, reason: str) -> tuple[Consistency, str | None]:
    """The consistency of a take that cannot quiesce (``reason``), or the refusal."""
    if quiesce == Quiesce.YES:
        raise QuiesceUnavailable(
            f"cannot quiesce: {reason}; nothing was taken (take it with --quiesce=try to fall"
            " back to a crash-consistent snapshot, or without --quiesce)"
        )
    if quiesce == Quiesce.TRY:
        return Consistency.CRASH, f"crash-consistent: {reason}"
    return Consistency.CRASH, None


def stopped_vm(quiesce: Quiesce) -> tuple[Consistency, str | None]:
    """A stopped VM has nothing in flight: its disks are what the guest last wrote, so a
    quiesced snapshot of it is application-consistent without asking anything of it."""
    if quiesce == Quiesce.NO:
        return Consistency.CRASH, None
    return Consistency.APPLICATION, "the VM was stopped: nothing was writing to its disks"
