"""A raw image's data blocks as a dynamic VHD stream, for ``PUT /import_raw_vdi?format=vhd``.

vhd-tool imports a VHD by writing only the blocks the stream carries into the VDI, which it
takes as pre-zeroed (``serve_vhd_to_raw``, vhd-tool ``impl.ml``); a raw import writes every
byte, and tapdisk allocates every block a write lands in, zeros included (blktap
``block-vhd.c`` ``vhd_queue_write``), so a thin VDI filled raw is fully allocated.

The layout is the one vhd-tool streams itself (``vhd_format/f.ml`` ``Vhd_input.vhd_common``):
footer at 0, header at 512, an empty sector, the BAT at 2048, then each present 2 MiB block
as a full sector bitmap and its data in BAT order, and the footer again. Present blocks are
those the raw file holds data in (SEEK_DATA/SEEK_HOLE): a hole is zeros.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from ...storage.checksum import data_segments

BLOCK = 2 * 1024 * 1024  # vhd-tool's default block size (2^12 sectors)
SECTOR = 512
BAT_OFFSET = 2048
_VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z, the VHD timestamp's origin
_ZEROS = bytes(BLOCK)


class SparseVhd:
    """A dynamic VHD of ``raw`` with virtual size ``size`` (at least the file's length: the
    rest reads as zeros). ``length`` is the stream's byte count; ``chunks()`` yields it
    and ``content_sha256()`` is then the SHA-256 of the disk it describes (``size``
    bytes), to compare with what the VDI reads back. ``also``: blocks carried even where
    ``raw`` holds none (as zeros), for a VDI that is not all zeros there: vhd-tool
    writes the blocks a VHD carries and leaves the others as they are."""

    def __init__(self, raw: Path, size: int, also: Iterable[int] = ()) -> None:
        self.raw, self.size = raw, size
        self.entries = (size + BLOCK - 1) // BLOCK
        with open(raw, "rb") as f:
            length = min(os.fstat(f.fileno()).st_size, size)
            present = {i for i in also if 0 <= i < self.entries}
            for a, b in data_segments(f.fileno(), 0, length):
                present.update(range(a // BLOCK, (b - 1) // BLOCK + 1))
        self.raw_length = length
        self.blocks = sorted(present)
        self.bat_bytes = _round_up(self.entries * 4, SECTOR)
        self.first_block = BAT_OFFSET + self.bat_bytes
        self.length = self.first_block + len(self.blocks) * (SECTOR + BLOCK) + SECTOR
        self._digest = hashlib.sha256()

    def chunks(self) -> Iterator[bytes]:
        footer = _footer(self.size)
        yield footer
        yield _header(self.entries)
        yield bytes(BAT_OFFSET - 3 * SECTOR)
        bat = bytearray(b"\xff" * (self.entries * 4))
        for n, index in enumerate(self.blocks):
            sector = (self.first_block + n * (SECTOR + BLOCK)) // SECTOR
            struct.pack_into(">I", bat, index * 4, sector)
        yield bytes(bat) + b"\xff" * (self.bat_bytes - len(bat))
        digest, done = self._digest, 0  # blocks of the disk hashed so far
        with open(self.raw, "rb") as f:
            for index in self.blocks:
                for zero in range(done, index):
                    digest.update(_ZEROS[: self._block_length(zero)])
                f.seek(index * BLOCK)
                data = f.read(min(BLOCK, max(self.raw_length - index * BLOCK, 0)))
                data += bytes(self._block_length(index) - len(data))
                digest.update(data)
                yield b"\xff" * SECTOR  # every sector of the block present
                yield data + bytes(BLOCK - len(data))
                done = index + 1
        for index in range(done, self.entries):
            digest.update(_ZEROS[: self._block_length(index)])
        yield footer

    def _block_length(self, index: int) -> int:
        """The disk's bytes in block ``index`` (the last one may be partial)."""
        return min(BLOCK, self.size - index * BLOCK)

    def content_sha256(self) -> str:
        return self._digest.hexdigest()


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def _checksum(buf: bytes | bytearray) -> int:
    """Ones' complement of the byte sum (the checksum field is zero when summed)."""
    return ~sum(buf) & 0xFFFFFFFF


def _geometry(size: int) -> tuple[int, int, int]:
    """CHS as the VHD specification computes it (appendix "CHS calculation")."""
    sectors = min(size // SECTOR, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = sectors // spt
    else:
        spt = 17
        cth = sectors // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = sectors // spt
    return cth // heads, heads, spt


def _footer(size: int) -> bytes:
    cylinders, heads, spt = _geometry(size)
    buf = bytearray(SECTOR)
    struct.pack_into(
        ">8sIIQI4sI4sQQHBBII16sB",
        buf,
        0,
        b"conectix",
        2,  # features: reserved bit set
        0x00010000,  # file format version
        SECTOR,  # data offset: the header
        max(int(time.time()) - _VHD_EPOCH, 0),
        b"sfry",  # creator application
        0x00010000,
        b"Wi2k",  # creator host OS
        size,  # original size
        size,  # current size
        cylinders,
        heads,
        spt,
        3,  # disk type: dynamic
        0,  # checksum, below
        uuid.uuid4().bytes,
        0,  # saved state
    )
    struct.pack_into(">I", buf, 64, _checksum(buf))
    return bytes(buf)


def _header(entries: int) -> bytes:
    buf = bytearray(2 * SECTOR)
    struct.pack_into(
        ">8sQQIIII",
        buf,
        0,
        b"cxsparse",
        0xFFFFFFFFFFFFFFFF,  # data offset: none
        BAT_OFFSET,  # table offset
        0x00010000,  # header version
        entries,  # max table entries
        BLOCK,
        0,  # checksum, below
    )
    struct.pack_into(">I", buf, 36, _checksum(buf))
    return bytes(buf)
