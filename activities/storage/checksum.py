"""A resumable whole-image checksum built from per-chunk SHA-256 digests.

Python's hashlib state cannot be saved, yet a backup must resume after a crash with its
checksum intact. So the whole-image checksum is a hash chain over fixed-size chunks:
``H0 = sha256(TAG)``, ``Hi = sha256(H(i-1) || sha256(chunk i))``. Its state is 32 bytes,
small enough to travel in every heartbeat, and anyone can recompute it from the image alone
(``snapferry backup verify`` does).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

ALGORITHM = "sha256-chain"
_TAG = b"snapferry-sha256-chain-v1"


def initial_state() -> str:
    return hashlib.sha256(_TAG).hexdigest()


def chunk_digest(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=8)
def zero_digest(length: int) -> str:
    """Digest of a chunk of zeros: holes are hashed without reading or allocating them."""
    return hashlib.sha256(bytes(length)).hexdigest()


def advance(state: str, digest: str) -> str:
    return hashlib.sha256(bytes.fromhex(state) + bytes.fromhex(digest)).hexdigest()


def format_checksum(state: str, chunk_size: int) -> str:
    return f"{ALGORITHM}:{chunk_size}:{state}"


def parse_checksum(checksum: str) -> tuple[int, str]:
    algorithm, chunk_size, state = checksum.split(":")
    if algorithm != ALGORITHM:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    return int(chunk_size), state


def file_checksum(path: str | os.PathLike[str], chunk_size: int) -> tuple[str, list[str]]:
    """Recompute the chain and the chunk digests of a finished file, by reading it whole."""
    state = initial_state()
    digests: list[str] = []
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            d = chunk_digest(view[:n])
            digests.append(d)
            state = advance(state, d)
    return format_checksum(state, chunk_size), digests
