"""A backup as a raw image, from whichever store on secondary holds it.

Backups are plain files (``snapshots/``, storage/secondary.py) or backups in the repository
(``repository/backups/``, storage/repository/), and a restore, a revert or a health check
takes either: the manifest's path says which. A repository backup is written out as a
sparse raw image on the worker's own disk (:func:`scratch_dir`: never on the store, which
holds no guest plaintext), under a name of its own, every chunk checked as it is written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .repository.store import RepositoryStore
from .secondary import SecondaryStore


def scratch_dir() -> Path:
    """Where a repository backup is written out for a restore: on the worker's own disk
    (``$SNAPFERRY_HOME/restore-scratch``, or ``SNAPFERRY_RESTORE_SCRATCH``), never on the
    store, which must hold no guest plaintext."""
    explicit = os.environ.get("SNAPFERRY_RESTORE_SCRATCH")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("SNAPFERRY_HOME", "./.snapferry")).absolute() / "restore-scratch"


def repository_of(manifest_path: str | Path) -> RepositoryStore | None:
    """The repository holding a backup manifest (``<root>/backups/<vm>/<disk>/<id>.json``),
    or None for a plain file's manifest."""
    path = Path(manifest_path)
    if path.suffix != ".json" or len(path.parents) < 4 or path.parents[2].name != "backups":
        return None
    root = path.parents[3]
    return RepositoryStore(root) if (root / "config.json").exists() else None


@contextlib.contextmanager
def backup_image(
    manifest_path: str | Path, *, on_progress: Callable[[int, int], None] | None = None
) -> Iterator[Path]:
    """The snapshot's raw image, verified, for as long as the context lasts.
    ``on_progress(done, total)`` keeps a long restore heartbeating."""
    report = on_progress or (lambda _d, _t: None)
    repository = repository_of(manifest_path)
    if repository is None:
        manifest = SecondaryStore.read_manifest(Path(manifest_path))
        with SecondaryStore.materialized(manifest, on_progress=report) as raw:
            yield raw
        return
    backup = repository.read_manifest(manifest_path)
    with repository.materialized(
        backup, scratch_dir(), progress=lambda done: report(done, backup.virtual_size)
    ) as raw:
        yield raw
