"""The VHD that ``export_raw_vdi?format=vhd`` streams, written as vhd-tool writes it, and a
small reader.

XAPI's handler (``ocaml/xapi/export_raw_vdi.ml``, ``localhost_handler``) runs
``vhd-tool stream --source-format hybrid --destination-format vhd [--relative-to <base>]``
(``ocaml/xapi/vhd_tool_wrapper.ml``, ``send``); vhd-tool builds the stream in
``ocaml/libs/vhd/vhd_format/f.ml``, ``Vhd_input.vhd_common`` (l.2969-3194 at xen-api
e2ee48d688), and ``ocaml/vhd-tool/src/impl.ml`` ``stream_raw`` writes it to the socket with
every ``Empty`` run expanded to zeros (the socket is not "prezeroed"). Layout, citing f.ml:

- 0: footer copy; 512: dynamic header; 1536: one empty sector (the parent locator's place,
  streamed as zeros); 2048: BAT, rounded up to a sector (l.2975-2984, l.3126-3139,
  ``BAT.sizeof_bytes`` l.1204). No batmap (``emit_batmap`` is false, l.2969).
- Footer (``Footer.create`` l.396 with vhd_common's arguments l.2994): creator ``caml``
  version 1, host OS 0, time stamp 0, features 2 (the reserved bit, ``Feature.to_int32``
  l.118), ``data_offset`` 512, ``original_size = current_size`` = the VDI's virtual size
  (not rounded), CHS from ``Geometry.of_sectors`` (l.193), a fresh random uid per export.
  Disk type 3 (dynamic) for a full export, 4 (differencing) with ``base`` (l.2987-2993).
- Header (``Header.create`` l.830): 2 MiB blocks, ``max_table_entries`` = the size rounded
  up to whole blocks. With ``base`` (l.3003-3017): ``parent_unique_id`` = the footer uid of
  the base's leaf VHD, ``parent_time_stamp`` = its file's mtime (VHD epoch),
  ``parent_unicode_name`` = its file name in UTF-16BE (``UTF16.marshal``), and locator 0 =
  ``MacX``, ``file://<name>``, 1 sector of space at offset 1536 (``Parent_locator.
  from_filename`` l.791; ``marshal`` l.755 stores the space in sectors). The locator's
  data is never written: the stream carries an empty sector there (l.3135).
- Blocks (l.2781-2823, ``include_block``): without ``base``, every block allocated in any
  BAT of the VDI's chain (``in_any_bat``); with ``base``, every block allocated in a VHD that
  is on one chain and not the other (``union (diff t from) (diff from t)``, VHDs keyed by
  footer uid and file name). Chosen by allocation, not by comparing bytes: a block written
  with the same bytes is still sent.
- Each included block is complete: a sector bitmap with *every* bit set ("We'll always set
  all bitmap bits", l.3026-3030), then all 4096 sectors copied from the raw device view
  (``Hybrid_input`` passes ``raw``, l.3093-3102), so a block holds the VDI's bytes, not only
  the sectors its own VHD wrote. Blocks follow in BAT order (l.3060-3067), then the footer.
  A last block past the virtual size is zero-padded here (SM rounds VHD sizes up to 2 MiB,
  so a real export never has one).

The reader (``read_vhd_blocks``/``apply_vhd``) is shared with the project so it can
rebuild a disk from a full export plus deltas.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .disks import data_blocks, read_at

SECTOR = 512
BLOCK_SIZE = 2 << 20
UNUSED = 0xFFFFFFFF
FOOTER_COOKIE, HEADER_COOKIE = b"conectix", b"cxsparse"
DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 2, 3, 4
HEADER_OFFSET, LOCATOR_OFFSET, TABLE_OFFSET = 512, 1536, 2048  # f.ml l.2975-2984
PLATFORM_MACX = 0x4D616358  # f.ml Platform_code.macx
_VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z


def _checksum(buf: bytes) -> int:
    """Ones' complement of the byte sum (the checksum field must already be zero)."""
    return ~sum(buf) & 0xFFFFFFFF


def _with_checksum(buf: bytearray, at: int) -> bytes:
    struct.pack_into(">I", buf, at, _checksum(bytes(buf)))
    return bytes(buf)


def chs_geometry(size: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors/track as f.ml's ``Geometry.of_sectors`` (the spec's
    appendix; note its strict ``>`` for the 255-sector case)."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total > 65535 * 16 * 63:
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


def footer(size: int, unique_id: bytes, disk_type: int = DISK_DYNAMIC) -> bytes:
    """vhd-tool's footer (``Footer.create`` defaults: creator ``caml`` 0x1, OS 0, time 0)."""
    cyl, heads, spt = chs_geometry(size)
    data_offset = HEADER_OFFSET if disk_type != DISK_FIXED else 0xFFFFFFFFFFFFFFFF
    buf = bytearray(SECTOR)
    struct.pack_into(
        ">8sIIQI4sI4sQQHBBII16sB",
        buf,
        0,
        FOOTER_COOKIE,
        2,  # features: reserved bit always set (Feature.to_int32)
        0x00010000,  # file format version
        data_offset,
        0,  # time stamp: Footer.create's default, vhd_common passes none
        b"caml",
        0x00000001,  # creator version (default_creator_version)
        b"\0\0\0\0",  # creator host OS: Other 0
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


@dataclass(frozen=True)
class Parent:
    """What a differencing export names as its parent: the base VDI's leaf VHD."""

    uid: bytes
    filename: str
    time_stamp: int


def dynamic_header(entries: int, parent: Parent | None = None) -> bytes:
    buf = bytearray(1024)
    struct.pack_into(
        ">8sQQIII", buf, 0, HEADER_COOKIE, 0xFFFFFFFFFFFFFFFF, TABLE_OFFSET, 0x00010000,
        entries, BLOCK_SIZE,
    )  # fmt: skip
    if parent is not None:
        struct.pack_into(">16sI", buf, 40, parent.uid, parent.time_stamp & 0xFFFFFFFF)
        name = parent.filename.encode("utf-16-be")[:512]
        buf[64 : 64 + len(name)] = name
        uri = b"file://" + parent.filename.encode()
        # locator 0 (f.ml from_filename + marshal): code, space in sectors, length,
        # reserved, offset; the other seven stay null.
        struct.pack_into(">IIIIQ", buf, 576, PLATFORM_MACX, 1, len(uri), 0, LOCATOR_OFFSET)
    return _with_checksum(buf, 36)


def _bitmap_size(block_size: int) -> int:
    return -(-(block_size // SECTOR // 8) // SECTOR) * SECTOR


FULL_BITMAP = b"\xff" * _bitmap_size(BLOCK_SIZE)  # f.ml l.3026: always all bits set


@dataclass
class VhdPlan:
    """Everything needed to stream one export: its blocks, uid and (for a delta) parent."""

    size: int
    blocks: list[int]
    unique_id: bytes = field(default_factory=lambda: uuid.uuid4().bytes)
    parent: Parent | None = None

    @property
    def disk_type(self) -> int:
        return DISK_DIFFERENCING if self.parent is not None else DISK_DYNAMIC

    @property
    def entries(self) -> int:
        return -(-self.size // BLOCK_SIZE)

    @property
    def bat_bytes(self) -> int:
        return -(-(self.entries * 4) // SECTOR) * SECTOR

    @property
    def first_block_offset(self) -> int:
        return TABLE_OFFSET + self.bat_bytes

    @property
    def length(self) -> int:
        per_block = _bitmap_size(BLOCK_SIZE) + BLOCK_SIZE
        return self.first_block_offset + len(self.blocks) * per_block + SECTOR


def plan_vhd(size: int, blocks: Iterable[int], parent: Parent | None = None) -> VhdPlan:
    """An export of ``blocks`` (indices beyond the disk are dropped, as
    ``used_max_table_entries`` bounds vhd-tool's loop)."""
    if size % SECTOR:
        raise ValueError("VHD virtual size must be a multiple of 512")
    entries = -(-size // BLOCK_SIZE)
    return VhdPlan(size, sorted(i for i in set(blocks) if 0 <= i < entries), parent=parent)


def stream_vhd(f: BinaryIO, plan: VhdPlan) -> Iterator[bytes]:
    """Yield the VHD file in pieces; total length is exactly ``plan.length``."""
    foot = footer(plan.size, plan.unique_id, plan.disk_type)
    yield foot
    yield dynamic_header(plan.entries, plan.parent)
    yield bytes(SECTOR)  # the parent locator's sector, streamed empty (f.ml l.3135)
    bat = [UNUSED] * plan.entries
    per_block = _bitmap_size(BLOCK_SIZE) + BLOCK_SIZE
    for n, i in enumerate(plan.blocks):
        bat[i] = (plan.first_block_offset + n * per_block) // SECTOR
    table = struct.pack(f">{plan.entries}I", *bat)
    yield table + b"\xff" * (plan.bat_bytes - len(table))
    for i in plan.blocks:
        yield FULL_BITMAP
        data = read_at(f, i * BLOCK_SIZE, min(BLOCK_SIZE, plan.size - i * BLOCK_SIZE))
        yield data + bytes(BLOCK_SIZE - len(data))  # a short last block is zero-padded
    yield foot


def write_vhd(raw_path: Path, out_path: Path, blocks: Iterable[int] | None = None) -> int:
    """Convenience for tests: a dynamic VHD of a raw file with ``blocks`` (default: the
    blocks holding data); returns the block count."""
    size = raw_path.stat().st_size
    with open(raw_path, "rb") as f, open(out_path, "wb") as out:
        plan = plan_vhd(size, data_blocks(f, size, BLOCK_SIZE) if blocks is None else blocks)
        for piece in stream_vhd(f, plan):
            out.write(piece)
    return len(plan.blocks)


# ----- reader ------------------------------------------------------------------------


@dataclass
class VhdInfo:
    virtual_size: int
    block_size: int
    disk_type: int
    parent_uid: bytes = bytes(16)
    table_offset: int = 0


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
    info = VhdInfo(size, block_size, disk_type, hdr[40:56], table_offset)

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
