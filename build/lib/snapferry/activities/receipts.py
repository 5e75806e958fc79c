"""Receipts of what a host worker has done for a snapshot, so that no history can make it do
it twice.

A Temporal reset (``temporal workflow reset``, an operator's replay tool) runs a workflow
again from an earlier point, activities included. A take that runs again would take a
*second* snapshot, at a later point in time, under the same ID, and its backup would carry
the wrong bytes. Drivers are idempotent while their snapshot exists (the overlay, clone or
VDI is found by its name); after it was merged away or deleted, only a receipt remembers that
the take happened. Reverts likewise: Temporal reapplies the updates that came after the
reset point, and a revert done again would throw away everything the guest wrote since; a
revert carries its update's ID, and a receipt per ID makes it happen once.

Receipts live in the worker's state directory (``$SNAPFERRY_HOME/receipts``), one small
JSON file per snapshot or operation, written atomically after the operation, and kept
after a delete (a reset of a deleted snapshot must not resurrect it).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .storage.files import atomic_write, make_dirs

_KIND = re.compile(r"^[a-z][a-z-]{0,31}$")


class Receipts:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, kind: str, key: str) -> Path:
        """``key``: a snapshot ID, or any caller-chosen operation ID (hashed, so that no
        name a caller picks can leave the receipts directory)."""
        assert _KIND.fullmatch(kind), kind
        return self.root / kind / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def get(self, kind: str, key: str) -> str | None:
        path = self._path(kind, key)
        return path.read_text() if path.exists() else None

    def put(self, kind: str, key: str, payload: str) -> None:
        path = self._path(kind, key)
        make_dirs(path.parent)
        atomic_write(path, payload)
