"""Blobs: how one chunk (or one segment of a backup index) is stored, and found again.

A blob's ID is SHA-256 of its plaintext, or HMAC-SHA256 under the chunk-ID key when the
repository is encrypted (keys.py). Its stored form is::

    flags (1 byte)  bit 0: zstd-compressed, bit 1: AES-256-GCM sealed
    [nonce (12 bytes)]                        when sealed
    payload                                   compressed or not; sealed: ciphertext + tag

A chunk is stored compressed only when that makes it smaller, so incompressible (random or
already compressed) data costs one byte, or 29 bytes sealed, per 64 KiB: 0.05 %. The ID is
the GCM associated data, so a blob moved under another ID fails to open; and whatever the
key, damage is never returned as data: a sealed blob's GCM tag covers its ciphertext and its
ID (computed from the plaintext when it was sealed), an unsealed one's ID is recomputed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ...errors import BackupCorrupt
from .keys import RepositoryKey

ID_BYTES = 32
ZERO_ID = bytes(ID_BYTES)  # a chunk (or segment) of zeros: stored nowhere
COMPRESSED = 1
SEALED = 2
NONCE_BYTES = 12
DEFAULT_ZSTD_LEVEL = 3


class BlobCodec:
    """Encodes and decodes blobs for one repository (its key, if any, and zstd level).

    zstd contexts are not thread-safe: each thread gets its own, so the copy pool's threads
    compress side by side (zstd releases the GIL while it works)."""

    def __init__(self, key: RepositoryKey | None, *, level: int = DEFAULT_ZSTD_LEVEL) -> None:
        if not 1 <= level <= 22:
            raise ValueError(f"zstd level {level} is not within 1..22")
        self.key = key
        self.level = level
        self._aead = AESGCM(key.encryption_key) if key is not None else None
        self._local = threading.local()

    def blob_id(self, plaintext: bytes | memoryview) -> bytes:
        if self.key is None:
            return hashlib.sha256(plaintext).digest()
        # hmac.new, not the one-shot hmac.digest: only the object's update releases the GIL
        # while it hashes, which is what lets the copy pool hash on both cores.
        return hmac.new(self.key.id_key, plaintext, hashlib.sha256).digest()

    def _zstd(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        pair = getattr(self._local, "pair", None)
        if pair is None:
            pair = (zstandard.ZstdCompressor(level=self.level), zstandard.ZstdDecompressor())
            self._local.pair = pair
        return pair

    def encode(self, blob_id: bytes, plaintext: bytes | memoryview) -> bytes:
        compressor, _ = self._zstd()
        packed = compressor.compress(plaintext)
        flags, payload = (COMPRESSED, packed) if len(packed) < len(plaintext) else (0, plaintext)
        if self._aead is None:
            return b"".join((bytes((flags,)), payload))
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, bytes(payload), blob_id)
        return b"".join((bytes((flags | SEALED,)), nonce, sealed))  # one copy, not two

    def decode(self, blob_id: bytes, stored: bytes | memoryview, *, where: str) -> bytes:
        """The plaintext of a stored blob, or BackupCorrupt naming ``where``: never wrong bytes."""
        if not stored:
            raise BackupCorrupt(f"{where}: empty blob")
        flags, body = stored[0], memoryview(stored)[1:]
        if flags & SEALED:
            if self._aead is None:
                raise BackupCorrupt(f"{where}: the blob is encrypted and no key was given")
            try:
                body = memoryview(
                    self._aead.decrypt(
                        bytes(body[:NONCE_BYTES]), bytes(body[NONCE_BYTES:]), blob_id
                    )
                )
            except InvalidTag:
                raise BackupCorrupt(
                    f"{where}: the blob does not open with this key (damaged, or another key)"
                ) from None
        elif self._aead is not None:
            raise BackupCorrupt(f"{where}: an unencrypted blob in an encrypted repository")
        if flags & COMPRESSED:
            _, decompressor = self._zstd()
            try:
                plaintext = decompressor.decompress(bytes(body))
            except zstandard.ZstdError as err:
                raise BackupCorrupt(f"{where}: the blob does not decompress ({err})") from None
        else:
            plaintext = bytes(body)
        # A sealed blob opened: its tag authenticated the ciphertext and, as associated
        # data, the ID it was sealed under, which was computed from this very plaintext.
        # An unsealed one has only its ID to check it by.
        if not flags & SEALED and self.blob_id(plaintext) != blob_id:
            raise BackupCorrupt(f"{where}: the blob's content does not match its ID")
        return plaintext
