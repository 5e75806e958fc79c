"""Dynamic VHD writer (what ``export_raw_vdi?format=vhd`` streams) and a small reader.

Layout written (Microsoft VHD spec, all big-endian): footer copy at 0, dynamic disk
header at 512, BAT at 1536 (padded to a sector), then each present 2 MiB block as a
512-byte sector bitmap followed by its data, then the footer. Creator is ``tap`` so
qemu sizes the disk from ``current_size`` rather than CHS geometry, as for XenServer.

A delta (``base=``) is the same format with only the blocks that differ from the
base; absent blocks mean "unchanged", so importing it applies just those blocks.
The reader (``read_vhd_blocks``/``apply_vhd``) is shared with the project so it can
rebuild a disk from a full export plus deltas.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .disks import data_blocks, read_at

SECTOR = 512
BLOCK_SIZE = 2 << 20
UNUSED = 0xFFFFFFFF
FOOTER_COOKIE, HEADER_COOKIE = b"conectix", b"cxsparse"
DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 2, 3, 4
_VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z


def _checksum(buf: bytes) -> int:
    """Ones' complement of the byte sum (the checksum field must already be zero)."""
    return ~sum(buf) & 0xFFFFFFFF


def _with_checksum(buf: bytearray, at: int) -> bytes:
    struct.pack_into(">I", buf, at, _checksum(bytes(buf)))
    return bytes(buf)


def chs_geometry(size: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors/track per the VHD spec's appendix algorithm."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def footer(size: int, unique_id: bytes, timestamp: int, disk_type: int = DISK_DYNAMIC) -> bytes:
    cyl, heads, spt = chs_geometry(size)
    data_offset = SECTOR if disk_type != DISK_FIXED else 0xFFFFFFFFFFFFFFFF
    buf = bytearray(SECTOR)
    struct.pack_into(
        ">8sIIQI4sI4sQQHBBII16sB",
        buf,
        0,
        FOOTER_COOKIE,
        2,  # features: reserved bit always set
        0x00010000,  # file format version
        data_offset,
        timestamp,
        b"tap\0",
        0x00010003,  # creator version
        b"Lnux",
        size,  # original size
        size,  # current size
        cyl,
        heads,
        spt,
        disk_type,
        0,  # checksum, filled below
        unique_id,
        0,  # saved state
    )
    return _with_checksum(buf, 64)


def dynamic_header(table_offset: int, entries: int, block_size: int = BLOCK_SIZE) -> bytes:
    buf = bytearray(1024)
    struct.pack_into(
        ">8sQQIII", buf, 0, HEADER_COOKIE, 0xFFFFFFFFFFFFFFFF, table_offset, 0x00010000,
        entries, block_size,
    )  # fmt: skip
    return _with_checksum(buf, 36)


def _bitmap_size(block_size: int) -> int:
    return -(-(block_size // SECTOR // 8) // SECTOR) * SECTOR


def _block_bitmap(index: int, size: int, block_size: int) -> bytes:
    """All sectors of the block that lie inside the disk are marked present."""
    sectors = min(block_size, size - index * block_size) // SECTOR
    bits = bytearray(_bitmap_size(block_size))
    full, rest = divmod(sectors, 8)
    bits[:full] = b"\xff" * full
    if rest:
        bits[full] = (0xFF << (8 - rest)) & 0xFF
    return bytes(bits)


@dataclass
class VhdPlan:
    """Everything needed to stream a VHD and to announce its Content-Length up front."""

    size: int
    blocks: list[int]
    unique_id: bytes
    timestamp: int

    @property
    def entries(self) -> int:
        return -(-self.size // BLOCK_SIZE)

    @property
    def bat_bytes(self) -> int:
        return -(-(self.entries * 4) // SECTOR) * SECTOR

    @property
    def first_block_offset(self) -> int:
        return 3 * SECTOR + self.bat_bytes

    @property
    def length(self) -> int:
        per_block = _bitmap_size(BLOCK_SIZE) + BLOCK_SIZE
        return self.first_block_offset + len(self.blocks) * per_block + SECTOR


def present_blocks(f: BinaryIO, size: int, base: BinaryIO | None = None) -> list[int]:
    """Blocks to emit: non-zero ones, or (with ``base``) those whose bytes differ."""
    candidates = data_blocks(f, size, BLOCK_SIZE)
    if base is not None:
        candidates |= data_blocks(base, size, BLOCK_SIZE)
    out = []
    for i in sorted(candidates):
        length = min(BLOCK_SIZE, size - i * BLOCK_SIZE)
        data = read_at(f, i * BLOCK_SIZE, length)
        if base is None:
            if data.count(0) != len(data):
                out.append(i)
        elif data != read_at(base, i * BLOCK_SIZE, length):
            out.append(i)
    return out


def plan_vhd(f: BinaryIO, size: int, base: BinaryIO | None = None) -> VhdPlan:
    if size % SECTOR:
        raise ValueError("VHD virtual size must be a multiple of 512")
    stamp = int(time.time()) - _VHD_EPOCH
    return VhdPlan(size, present_blocks(f, size, base), uuid.uuid4().bytes, stamp)


def stream_vhd(f: BinaryIO, plan: VhdPlan) -> Iterator[bytes]:
    """Yield the VHD file in pieces; total length is exactly ``plan.length``."""
    foot = footer(plan.size, plan.unique_id, plan.timestamp)
    yield foot
    yield dynamic_header(3 * SECTOR, plan.entries)
    bat = [UNUSED] * plan.entries
    per_block = _bitmap_size(BLOCK_SIZE) + BLOCK_SIZE
    for n, i in enumerate(plan.blocks):
        bat[i] = (plan.first_block_offset + n * per_block) // SECTOR
    table = struct.pack(f">{plan.entries}I", *bat)
    yield table + b"\xff" * (plan.bat_bytes - len(table))
    for i in plan.blocks:
        yield _block_bitmap(i, plan.size, BLOCK_SIZE)
        data = read_at(f, i * BLOCK_SIZE, min(BLOCK_SIZE, plan.size - i * BLOCK_SIZE))
        yield data + bytes(BLOCK_SIZE - len(data))  # a short last block is zero-padded
    yield foot


def write_vhd(raw_path: Path, out_path: Path, base_path: Path | None = None) -> int:
    """Convenience for tests: write a (delta) VHD of a raw file; returns block count."""
    size = raw_path.stat().st_size
    with open(raw_path, "rb") as f, open(out_path, "wb") as out:
        base = open(base_path, "rb") if base_path else None  # noqa: SIM115
        try:
            plan = plan_vhd(f, size, base)
        finally:
            if base:
                base.close()
        for piece in stream_vhd(f, plan):
            out.write(piece)
    return len(plan.blocks)


# ----- reader ------------------------------------------------------------------------


@dataclass
class VhdInfo:
    virtual_size: int
    block_size: int
    disk_type: int


def _read_exact(f: BinaryIO, offset: int, length: int) -> bytes:
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise ValueError(f"truncated VHD: wanted {length} bytes at {offset}")
    return data


def _parse_footer(buf: bytes) -> tuple[int, int, int]:
    """Return ``(data_offset, current_size, disk_type)`` after checking the checksum."""
    if buf[:8] != FOOTER_COOKIE:
        raise ValueError("not a VHD: footer cookie 'conectix' missing")
    data_offset, size = struct.unpack_from(">Q", buf, 16)[0], struct.unpack_from(">Q", buf, 48)[0]
    disk_type, checksum = struct.unpack_from(">II", buf, 60)
    if _checksum(buf[:64] + b"\0" * 4 + buf[68:]) != checksum:
        raise ValueError("VHD footer checksum mismatch")
    return data_offset, size, disk_type


def iter_vhd(f: BinaryIO) -> tuple[VhdInfo, Iterator[tuple[int, bytes, bytes | None]]]:
    """Parse a VHD; yields ``(block_index, data, sector_bitmap or None)`` per present block.

    Data of the last block is trimmed to the virtual size. Fixed VHDs report every
    block present with no bitmap.
    """
    end = f.seek(0, os.SEEK_END)
    if end < SECTOR:
        raise ValueError("not a VHD: shorter than one sector")
    data_offset, size, disk_type = _parse_footer(_read_exact(f, end - SECTOR, SECTOR))
    if disk_type == DISK_FIXED:
        info = VhdInfo(size, BLOCK_SIZE, disk_type)

        def fixed() -> Iterator[tuple[int, bytes, bytes | None]]:
            for i in range(-(-size // BLOCK_SIZE)):
                length = min(BLOCK_SIZE, size - i * BLOCK_SIZE)
                yield i, _read_exact(f, i * BLOCK_SIZE, length), None

        return info, fixed()
    if disk_type not in (DISK_DYNAMIC, DISK_DIFFERENCING):
        raise ValueError(f"unsupported VHD disk type {disk_type}")
    hdr = _read_exact(f, data_offset, 1024)
    if hdr[:8] != HEADER_COOKIE:
        raise ValueError("VHD dynamic header cookie 'cxsparse' missing")
    table_offset, _, entries, block_size, checksum = struct.unpack_from(">QIIII", hdr, 16)
    if _checksum(hdr[:36] + b"\0" * 4 + hdr[40:]) != checksum:
        raise ValueError("VHD dynamic header checksum mismatch")
    if entries * block_size < size:
        raise ValueError("VHD block table too small for the virtual size")
    bat = struct.unpack(f">{entries}I", _read_exact(f, table_offset, entries * 4))
    bitmap_len = _bitmap_size(block_size)
    info = VhdInfo(size, block_size, disk_type)

    def dynamic() -> Iterator[tuple[int, bytes, bytes | None]]:
        for i, sector in sorted(enumerate(bat), key=lambda e: e[1]):
            if sector == UNUSED or i * block_size >= size:
                continue
            length = min(block_size, size - i * block_size)
            bitmap = _read_exact(f, sector * SECTOR, bitmap_len)
            yield i, _read_exact(f, sector * SECTOR + bitmap_len, length), bitmap

    return info, dynamic()


def read_vhd_blocks(path: str | Path) -> tuple[int, int, dict[int, bytes]]:
    """``(virtual_size, block_size, {block_index: bytes})`` of the blocks present.

    Holds every present block in memory, so it is meant for test-sized images; use
    ``apply_vhd`` to rebuild large disks.
    """
    with open(path, "rb") as f:
        info, blocks = iter_vhd(f)
        return info.virtual_size, info.block_size, {i: data for i, data, _ in blocks}


def _all_set(bitmap: bytes, sectors: int) -> bool:
    full, rest = divmod(sectors, 8)
    mask = (0xFF << (8 - rest)) & 0xFF
    return bitmap[:full] == b"\xff" * full and (not rest or bitmap[full] & mask == mask)


def _sector_runs(bitmap: bytes, sectors: int) -> Iterator[tuple[int, int]]:
    """``(first_sector, count)`` runs whose bitmap bit is set."""
    start = None
    for s in range(sectors):
        on = bool(bitmap[s >> 3] & (0x80 >> (s & 7)))
        if on and start is None:
            start = s
        elif not on and start is not None:
            yield start, s - start
            start = None
    if start is not None:
        yield start, sectors - start


def apply_vhd(path: str | Path, raw_target_path: str | Path) -> int:
    """Write the VHD's present blocks over a raw file; returns how many were applied.

    The target is created if missing and grown (never shrunk) to the virtual size.
    Only sectors marked in a block's bitmap are written, so absent data keeps the
    target's bytes: apply a full export, then each delta in order, to rebuild a disk.
    """
    applied = 0
    with open(path, "rb") as f:
        info, blocks = iter_vhd(f)
        target = Path(raw_target_path)
        target.touch(exist_ok=True)
        with open(target, "r+b") as out:
            if out.seek(0, os.SEEK_END) < info.virtual_size:
                out.truncate(info.virtual_size)
            for i, data, bitmap in blocks:
                base = i * info.block_size
                sectors = -(-len(data) // SECTOR)
                if bitmap is None or _all_set(bitmap, sectors):
                    runs: list[tuple[int, int]] = [(0, sectors)]
                else:
                    runs = list(_sector_runs(bitmap, sectors))
                for first, count in runs:
                    out.seek(base + first * SECTOR)
                    out.write(data[first * SECTOR : (first + count) * SECTOR])
                applied += 1
    return applied
