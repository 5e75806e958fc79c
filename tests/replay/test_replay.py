"""Replay recorded histories against the current workflow code (non-determinism guard)."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from snapferry.workers.converter import DATA_CONVERTER
from snapferry.workflows.snapshot import BackupSnapshotWorkflow, VolumeSnapshotWorkflow
from snapferry.workflows.vm_snapshot import VmSnapshotWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_histories_are_recorded() -> None:
    names = {p.name for p in HISTORIES}
    assert {
        "volume-snapshot-happy.json",
        "volume-snapshot-failed-then-retried.json",
        "backup-snapshot-happy.json",
        "backup-snapshot-failed-then-retried.json",
        "volume-snapshot-entity-reverted-deleted.json",
        "vm-snapshot-reverted-deleted.json",
    } <= names


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path: Path) -> None:
    replayer = Replayer(
        workflows=[VolumeSnapshotWorkflow, BackupSnapshotWorkflow, VmSnapshotWorkflow],
        data_converter=DATA_CONVERTER,
    )
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure
