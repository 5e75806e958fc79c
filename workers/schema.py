"""JSON Schemas of the payloads, so management code in any language can call by name."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from snapferry.activities import contracts

EXPORTED: list[type[BaseModel]] = [
    contracts.SnapshotRequest,
    contracts.SnapshotRecord,
    contracts.BackupRequest,
    contracts.BackupResult,
    contracts.BackupProgress,
    contracts.TakeRequest,
    contracts.ReleaseRequest,
    contracts.CopyRequest,
    contracts.PrimarySnapshot,
    contracts.Alert,
    contracts.VmSnapshotRequest,
    contracts.VmSnapshotRecord,
    contracts.RestoreResult,
    contracts.RepositoryJobRequest,
    contracts.RepositoryJobResult,
]


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model in EXPORTED:
        path = out / f"{model.__name__}.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2) + "\n")
        written.append(path)
    return written
