"""The backup repository on secondary storage: deduplicated, compressed, optionally
encrypted chunks in pack files, and one complete index per backup (see layout.py)."""

from .backups import BackupManifest, BackupReader, BackupWriter
from .keys import RepositoryKey, RepositoryKeyError, create_key_file, key_from_env, load_key_file
from .repository import Repository

__all__ = [
    "BackupManifest",
    "BackupReader",
    "BackupWriter",
    "Repository",
    "RepositoryKey",
    "RepositoryKeyError",
    "create_key_file",
    "key_from_env",
    "load_key_file",
]
