"""How often a backup's progress reaches its workflow, over the backup's whole life.

Each progress signal is an event in the BackupSnapshot child's history, so their number must
stay bounded however long a backup runs and however often it is retried. The interval grows
with the backup's age, measured from its first attempt (a retry starts the attempt clock
again, not this one): about ``1000 × ln(age / (1000 × base))`` signals past the first
``1000`` intervals, a few thousand for a week-long backup.
"""

from __future__ import annotations

from datetime import datetime


def signal_interval(*, base_s: float, backup_started: datetime | None, now: float) -> float:
    """Seconds between progress signals; ``now`` is the wall clock (``time.time()``), since
    the first attempt may have run on another machine."""
    if backup_started is None:
        return base_s
    return max(base_s, (now - backup_started.timestamp()) / 1000)
