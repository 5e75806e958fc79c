"""The backup progress bar, shared by ``snapferry snapshot watch`` and the demo."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from snapferry.activities.contracts import (
    SnapshotRecord,
    SnapshotState,
)
from snapferry.workflows.backup import text_bar

from . import starter


async def watch(client: Any, snapshot_id: str, *, out: Any = sys.stdout) -> SnapshotRecord:
    """Draw the backup's progress until the snapshot is BackedUp or its backup failed."""
    while True:
        record = await starter.get_record(client, snapshot_id)
        if record.state in (SnapshotState.BACKED_UP, SnapshotState.ERROR) or record.backup_error:
            if record.state == SnapshotState.BACKED_UP:
                size = record.backup.virtual_size if record.backup else 0
                out.write(f"\r{text_bar(size, size, 40)} BackedUp" + " " * 20 + "\n")
            return record
        progress = await starter.backup_progress(client, record)
        if progress:
            out.write(
                f"\r{text_bar(progress.bytes_done, progress.bytes_total, 40)}"
                f" {progress.bytes_done // 2**20}/{progress.bytes_total // 2**20} MiB"
                f" {progress.bytes_per_second / 1e6:6.0f} MB/s  {record.state.value}"
            )
        else:
            out.write(f"\r{text_bar(0, 1, 40)} {record.state.value}")
        out.flush()
        await asyncio.sleep(0.2)
