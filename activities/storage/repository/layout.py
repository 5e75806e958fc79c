"""Where things are in a repository, and its config (what every reader must agree on).

::

    <root>/config.json                          format version, chunk and segment sizes,
                                                the key's fingerprint (or none)
    <root>/packs/<aa>/<name>.pack               blobs (packs.py), a random 256-bit name
    <root>/packs/tmp/<uuid>.partial             a pack being written
    <root>/index/<uuid>.idx                     blob ID -> pack, offset (index.py)
    <root>/backups/<vm>/<disk>/<snapshot>.segments   the backup's index (backups.py)
    <root>/backups/<vm>/<disk>/<snapshot>.json  its manifest, written last: present = whole
    <root>/writers/<uuid>.json                  a backup being written (gc keeps its data)
    <root>/damaged.json                         blob copies a verify found damaged
    <root>/jobs/<verify|gc>.json                when the job last ran to its end, its counts
    <root>/locks/                               flock files (index merge, pack deletion)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel

from ...errors import InvalidInput
from ..files import atomic_write, make_dirs
from .keys import RepositoryKey, RepositoryKeyError

FORMAT_VERSION = 1
CHUNK_BYTES = 64 * 1024
SEGMENT_CHUNKS = 64  # a segment (one entry of a backup's index) covers 4 MiB
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}$")


class RepositoryConfig(BaseModel):
    format_version: int = FORMAT_VERSION
    chunk_bytes: int = CHUNK_BYTES
    segment_chunks: int = SEGMENT_CHUNKS
    key_fingerprint: str | None = None


def config_path(root: Path) -> Path:
    return root / "config.json"


def load_or_create_config(root: Path, key: RepositoryKey | None) -> RepositoryConfig:
    """The repository's config; a new repository is made for ``key``. A key that does not
    match (or a missing one) is refused here, before anything is read or written."""
    path = config_path(root)
    fingerprint = key.fingerprint if key is not None else None
    if not path.exists():
        make_dirs(root)
        config = RepositoryConfig(key_fingerprint=fingerprint)
        atomic_write(path, config.model_dump_json(indent=2))
        return config
    config = RepositoryConfig.model_validate(json.loads(path.read_text()))
    if config.format_version != FORMAT_VERSION:
        raise InvalidInput(f"{root}: repository format {config.format_version} is not known")
    if config.key_fingerprint != fingerprint:
        if config.key_fingerprint is None:
            raise RepositoryKeyError(f"{root} is an unencrypted repository: give it no key")
        if fingerprint is None:
            raise RepositoryKeyError(
                f"{root} is encrypted (key {config.key_fingerprint}): set"
                " SNAPFERRY_REPOSITORY_KEY_FILE to its key file"
            )
        raise RepositoryKeyError(
            f"{root} was made with key {config.key_fingerprint}, not {fingerprint}"
        )
    return config


def check_name(what: str, value: str) -> str:
    if not _NAME.match(value) or value in (".", ".."):
        raise InvalidInput(f"{what} {value!r} is not a valid name (letters, digits, ._:+-)")
    return value


def backup_dir(root: Path, vm: str, disk: str) -> Path:
    return root / "backups" / check_name("VM", vm) / check_name("disk", disk)
