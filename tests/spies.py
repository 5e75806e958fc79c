"""Spies on the durability calls (fsync, rename), for tests of the order they come in."""

from __future__ import annotations

import os

import pytest


def record_fsyncs_and_renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """From now on, ``("fsync", path)`` for each os.fsync (the fd resolved through /proc)
    and ``("replace", destination)`` for each os.replace, in the order they happen."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:  # type: ignore[no-untyped-def]
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def record_snapshot_ids(monkeypatch: pytest.MonkeyPatch, cls: type, method: str) -> list[str]:
    """From now on, the snapshot ID of every call of ``cls.method`` (a real driver's take,
    revert, ...), which still runs as before: to count what a host really did."""
    calls: list[str] = []
    real = getattr(cls, method)

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        first = args[0] if args else None
        calls.append(kwargs.get("snapshot_id") or getattr(first, "snapshot_id", ""))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, spy)
    return calls
