"""The backup repository's job contracts (``snapferry repository verify | gc | sync``).

``activities.contracts`` re-exports all of it; import from there.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from .contracts_base import Model


class RepositoryJobKind(StrEnum):
    """The backup repository's jobs (``snapferry repository verify | gc | sync``)."""

    VERIFY = "verify"
    GC = "gc"
    SYNC = "sync"


class RepositoryJobRequest(Model):
    """One run of a repository job on a backup worker (a schedule's tick, or an operator's)."""

    kind: RepositoryJobKind
    root: str | None = Field(None, description="The repository (default: the workers')")
    to: str | None = Field(None, description="sync: the second repository's directory")
    rate_limit_mbps: float | None = Field(
        None, gt=0, description="sync: at most this many MB/s copied (spares the link)"
    )


class RepositoryJobResult(Model):
    kind: RepositoryJobKind
    ok: bool = Field(description="False: verify found damage (an alert is raised)")
    summary: str
    counters: dict[str, int] = Field(default_factory=dict)
    damaged: list[str] = Field(
        default_factory=list, description="verify: each damaged snapshot and its first offset"
    )
