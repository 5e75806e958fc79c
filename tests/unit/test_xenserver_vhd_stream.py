"""The sparse VHD a new XenServer volume is imported as, read by parsers that are not the
driver's: the XAPI simulator's conformance parser (footer, header, BAT, bitmaps,
checksums) and qemu-img (``-f vpc``), for sizes that end on and off a block."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest

from snapferry.activities.hypervisors.xenserver.vhd_stream import BLOCK, SparseVhd
from tests.xapi_sim.conformance import parse_vhd, qemu_reads


@pytest.mark.parametrize(
    ("size", "blocks"),
    [(8 * BLOCK, {1: 70000, 6: 4096}), (5 * BLOCK + 1536, {0: 512, 4: 2048}), (BLOCK, {})],
)
def test_the_stream_holds_the_data_blocks_and_reads_as_the_image(
    tmp_path: Path, size: int, blocks: dict[int, int]
) -> None:
    rng = random.Random(size)
    raw = tmp_path / "image.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for index, length in blocks.items():
            f.seek(index * BLOCK + 512)
            f.write(rng.randbytes(min(length, size - index * BLOCK - 512)))
    image = raw.read_bytes()
    vhd = SparseVhd(raw, size)
    stream = b"".join(vhd.chunks())
    assert len(stream) == vhd.length
    assert vhd.content_sha256() == hashlib.sha256(image).hexdigest()
    parsed = parse_vhd(stream)
    assert parsed.disk_type == 3 and parsed.current_size == parsed.original_size == size
    assert set(parsed.blocks) == set(blocks) and parsed.bitmaps_full
    assert parsed.trailing_footer_equal and parsed.block_size == BLOCK
    for index, data in parsed.blocks.items():
        assert data[: len(image) - index * BLOCK] == image[index * BLOCK : (index + 1) * BLOCK]
    if shutil.which("qemu-img"):
        (tmp_path / "image.vhd").write_bytes(stream)
        assert qemu_reads(tmp_path / "image.vhd", tmp_path / "back.raw") == image


def test_blocks_asked_for_are_carried_as_zeros_and_the_disk_stays_the_image(
    tmp_path: Path,
) -> None:
    """A revert carries zeros where the VDI held data the image does not have; blocks
    past the disk's end are not asked of a VHD."""
    raw = tmp_path / "image.raw"
    with open(raw, "wb") as f:
        f.truncate(6 * BLOCK)
        f.seek(2 * BLOCK)
        f.write(b"\x55" * 1000)
    vhd = SparseVhd(raw, 6 * BLOCK, also=[0, 2, 5, 9])
    parsed = parse_vhd(b"".join(vhd.chunks()))
    assert sorted(parsed.blocks) == [0, 2, 5]
    assert parsed.blocks[0] == parsed.blocks[5] == bytes(BLOCK)
    assert vhd.content_sha256() == hashlib.sha256(raw.read_bytes()).hexdigest()
