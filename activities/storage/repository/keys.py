"""The repository key: one secret file, from which the encryption and chunk-ID keys derive.

``snapferry repository key create FILE`` writes 32 random bytes (hex, one line, mode 0600);
``SNAPFERRY_REPOSITORY_KEY_FILE`` names it to every process that reads or writes backups.
Two keys are derived from it with HKDF-SHA256 (RFC 5869), as Proxmox Backup Server derives
its ``id_key`` from the encryption key:

* the **chunk-ID key** makes chunk IDs HMAC-SHA256(id_key, plaintext), so equal plaintexts
  give equal IDs only to someone holding the key: the store does not reveal to an outsider
  that two VMs hold the same data, nor lets one confirm a guess of a known file's blocks;
* the **encryption key** seals every blob with AES-256-GCM (a fresh 96-bit nonce each).

The fingerprint, written in every manifest, is a truncated HMAC of a constant under a third
derived key: it names the key (a wrong key is caught before any chunk is read) without
revealing anything that helps guess it. There is no recovery: a lost key loses the backups.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ...errors import InvalidInput
from ..files import atomic_write

KEY_BYTES = 32
KEY_FILE_ENV = "SNAPFERRY_REPOSITORY_KEY_FILE"
_SALT = b"snapferry-repository-v1"


class RepositoryKeyError(InvalidInput):
    """The key is missing, unreadable, malformed, or not the one the repository was made with."""


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=purpose).derive(master)


@dataclass(frozen=True)
class RepositoryKey:
    id_key: bytes
    encryption_key: bytes
    fingerprint: str
    manifest_key: bytes = b""  # authenticates each backup's manifest (and so its index)

    @classmethod
    def from_master(cls, master: bytes) -> RepositoryKey:
        if len(master) != KEY_BYTES:
            raise RepositoryKeyError(f"a repository key is {KEY_BYTES} bytes, not {len(master)}")
        check = _derive(master, b"fingerprint")
        digest = hmac.new(check, b"snapferry key fingerprint", hashlib.sha256).hexdigest()
        fingerprint = ":".join(digest[i : i + 2] for i in range(0, 16, 2))
        return cls(
            id_key=_derive(master, b"chunk-id"),
            encryption_key=_derive(master, b"aes-256-gcm"),
            fingerprint=fingerprint,
            manifest_key=_derive(master, b"manifest-mac"),
        )

    def __repr__(self) -> str:  # never print key material (logs, tracebacks)
        return f"RepositoryKey(fingerprint={self.fingerprint})"


def create_key_file(path: Path) -> RepositoryKey:
    """Write a new random key to ``path`` (refused if it exists: overwriting loses backups)."""
    if path.exists():
        raise RepositoryKeyError(f"{path} exists: a key is never overwritten (its backups need it)")
    master = secrets.token_bytes(KEY_BYTES)
    atomic_write(path, master.hex() + "\n", mode=0o600)
    return RepositoryKey.from_master(master)


def load_key_file(path: Path) -> RepositoryKey:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise RepositoryKeyError(f"repository key file {path} does not exist") from None
    except OSError as err:
        raise RepositoryKeyError(f"repository key file {path} cannot be read: {err}") from None
    try:
        master = bytes.fromhex(text)
    except ValueError:
        raise RepositoryKeyError(
            f"repository key file {path} is not a key made by `snapferry repository key create`"
        ) from None
    return RepositoryKey.from_master(master)


def key_from_env() -> RepositoryKey | None:
    """The key named by SNAPFERRY_REPOSITORY_KEY_FILE, or None (the repository is unencrypted)."""
    name = os.environ.get(KEY_FILE_ENV, "").strip()
    return load_key_file(Path(name)) if name else None
