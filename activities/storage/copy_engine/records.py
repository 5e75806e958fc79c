"""What a copy is given and gives back: the checkpoint it heartbeats, where it writes, and
what it reports once done."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from .. import checksum


class Checkpoint(BaseModel):
    """What a backup heartbeats: enough to continue after any crash. ``state`` and
    ``zero_run`` are the checksum chain's (see :class:`~.checksum.Chain`); a checkpoint of
    another ``algorithm`` (one an older version heartbeated) is not resumed from."""

    chunks_done: int
    state: str
    chunk_size: int
    bytes_copied_total: int = 0
    algorithm: str = checksum.CHAIN
    zero_run: int = 0


@dataclass(frozen=True)
class CopyOutcome:
    checksum: str
    virtual_size: int
    bytes_copied: int
    bytes_written: int
    resumed_from: int
    chunks: int


@dataclass(frozen=True)
class CopyTarget:
    """The ``.partial`` data file and its digest list, finalized by the store later."""

    data: Path
    digests: Path
