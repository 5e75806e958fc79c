"""The check before the rename: a written file re-read from the medium."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ...errors import BackupCorrupt
from .. import checksum


def verify_copy(
    data: Path,
    expected: str,
    *,
    digests: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> checksum.VerifyReport:
    """Re-read a written file from the medium (its pages dropped first) and compare it with
    its chunk digests and chain checksum: the check before the rename. Only chunks that
    hold data (or whose digest says data) are read. ``on_progress(verified, read)`` keeps a
    long verify heartbeating."""
    try:
        return checksum.verify_file(data, expected, digests_path=digests, on_progress=on_progress)
    except (checksum.ChunkMismatch, EOFError) as exc:
        raise BackupCorrupt(str(exc)) from exc
