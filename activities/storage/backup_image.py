"""A backup as a raw image, from whichever store on secondary holds it.

Backups are plain files (``snapshots/``, storage/secondary.py) or backups in the repository
(``repository/backups/``, storage/repository/), and a restore, a revert or a health check
takes either: the manifest's path says which. A repository backup is written out as a
sparse raw image in ``restore-scratch/`` beside the repository (never inside it: no guest
plaintext on the store), every chunk checked against its ID as it is written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from .repository.store import RepositoryStore
from .secondary import SecondaryStore


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
    scratch = repository.root.parent / "restore-scratch"
    with repository.materialized(
        backup, scratch, progress=lambda done: report(done, backup.virtual_size)
    ) as raw:
        yield raw
