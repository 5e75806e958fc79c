"""The backup repository's jobs as an activity, for the schedules that run them.

``snapferry repository verify | gc | sync`` run a job in the operator's shell; a schedule
(``snapferry repository schedule``) runs the same job on a backup worker, which sees
secondary storage and holds the key (``SNAPFERRY_REPOSITORY_KEY_FILE``, never a payload).
Each job heartbeats a line per pack or backup it handles, so a worker that dies mid-job is
seen within the heartbeat timeout and the job runs again from the start (each job is safe
to run again: verify reads, gc re-marks, sync copies only what is missing).
"""

from __future__ import annotations

from pathlib import Path

from temporalio import activity

from .contracts import RepositoryJobKind, RepositoryJobRequest, RepositoryJobResult
from .errors import InvalidInput, converts_errors
from .names import RUN_REPOSITORY_JOB
from .settings import Settings
from .storage.repository import Repository, jobs, key_from_env


def _heartbeat(line: str) -> None:
    activity.heartbeat(line)


class RepositoryJobActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _root(self, req: RepositoryJobRequest) -> Path:
        root = Path(req.root) if req.root else self.settings.repository
        if not (root / "config.json").exists():
            raise InvalidInput(f"{root} is not a snapferry repository (no config.json)")
        return root

    @activity.defn(name=RUN_REPOSITORY_JOB)
    @converts_errors
    def run_repository_job(self, req: RepositoryJobRequest) -> RepositoryJobResult:
        root = self._root(req)
        if req.kind == RepositoryJobKind.SYNC:
            if not req.to:
                raise InvalidInput("a sync needs the second repository's directory (--to)")
            rate = req.rate_limit_mbps * 1e6 if req.rate_limit_mbps else None
            s = jobs.sync(root, Path(req.to), progress=_heartbeat, rate_limit_bps=rate)
            return RepositoryJobResult(
                kind=req.kind,
                ok=True,
                summary=f"copied {s.packs_copied} packs and {s.backups_copied} backups"
                f" ({s.bytes_copied} bytes) to {req.to}",
                counters={
                    "packs_copied": s.packs_copied,
                    "backups_copied": s.backups_copied,
                    "bytes_copied": s.bytes_copied,
                },
            )
        repo = Repository(root, key_from_env(), level=self.settings.repository_zstd_level)
        if req.kind == RepositoryJobKind.GC:
            g = jobs.gc(repo, progress=_heartbeat)
            return RepositoryJobResult(
                kind=req.kind,
                ok=True,
                summary=f"removed {g.packs_removed} packs ({g.bytes_freed} bytes); kept"
                f" {g.packs_live} in use and {g.packs_kept_young} too recent to judge",
                counters={"packs_removed": g.packs_removed, "bytes_freed": g.bytes_freed},
            )
        v = jobs.verify(repo, progress=_heartbeat)
        damaged = [
            f"snapshot {name}: {len(offsets)} damaged chunks, first at offset {offsets[0]}"
            for name, offsets in v.snapshots.items()
        ]
        summary = f"verified {v.packs} packs, {v.blobs} blobs, {v.bytes_read} bytes read"
        if not v.ok:
            summary += f"; damage in {len(v.damaged)} places, touching {len(damaged)} backups"
        return RepositoryJobResult(
            kind=req.kind,
            ok=v.ok,
            summary=summary,
            counters={"packs": v.packs, "blobs": v.blobs, "bytes_read": v.bytes_read},
            damaged=damaged + [f"damaged: {d}" for d in v.damaged],
        )
