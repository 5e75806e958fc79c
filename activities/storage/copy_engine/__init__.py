"""The copy loop, written once: chunking, sparse skipping, checksums, checkpoints, resume.

Vendors supply only a :class:`~activities.storage.reader.SnapshotReader`; this package owns
everything that must be right for every hypervisor (the Cinder ``ChunkedBackupDriver`` idea).

Durability contract: a checkpoint is reported only after the data and the chunk-digest file
up to its offset were fsynced, and the data file is cut to end exactly at that offset.
Resuming from a checkpoint truncates both files back to it, so bytes written after the last
checkpoint, including stale bytes over later holes, are never trusted.

Cost: a checkpoint is taken after ``checkpoint_bytes`` of data or ``checkpoint_seconds``,
whichever comes first, and between checkpoints the writeback of what was written is started
at once (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, in 64 MiB batches), so the checkpoint's
fdatasync finds little left to write. ``make bench`` measures what
checkpointing costs against the same copy with no checkpoint but the last.

One module per concern:

- ``engine``: :class:`CopyEngine`, the read loop, the hasher stage and the resume point;
- ``writer``: the writer and sync stages (writes, digest lines, writeback, checkpoints);
- ``records``: :class:`Checkpoint`, :class:`CopyTarget` and :class:`CopyOutcome`;
- ``stop``: :class:`StopFlag`, why a copy stops early (a cancel or a stall);
- ``verify``: :func:`verify_copy`, the re-read before the rename.
"""

from .engine import CHECKPOINT_BYTES, CHECKPOINT_SECONDS, CopyEngine
from .records import Checkpoint, CopyOutcome, CopyTarget
from .stop import StopFlag
from .verify import verify_copy
from .writer import SYNC_FILE_RANGE_WRITE, sync_file_range

__all__ = [
    "CHECKPOINT_BYTES",
    "CHECKPOINT_SECONDS",
    "SYNC_FILE_RANGE_WRITE",
    "Checkpoint",
    "CopyEngine",
    "CopyOutcome",
    "CopyTarget",
    "StopFlag",
    "sync_file_range",
    "verify_copy",
]
