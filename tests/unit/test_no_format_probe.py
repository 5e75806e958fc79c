"""Formats are never probed: a guest's forged image header cannot make the host read
another file."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from snapferry.activities.errors import UnsupportedImage
from snapferry.activities.storage.copy_engine import CopyEngine, CopyTarget
from snapferry.activities.storage.reader import QemuImageReader, image_chain
from tests.inotify import watch_opens

MIB = 1024 * 1024


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def forged_raw_disk(tmp_path: Path, *, victim: Path, size: int = 8 * MIB) -> Path:
    """A raw disk whose guest wrote a complete qcow2 image (backing file: ``victim``, with
    its format recorded) at its start, then data: what a hostile tenant can do."""
    header = tmp_path / "forged.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(victim), "-F", "raw", str(header))
    disk = tmp_path / "tenant-a.raw"
    with open(disk, "wb") as f:
        f.write(header.read_bytes())
        f.seek(4 * MIB)
        f.write(b"\x5a" * MIB)
        f.truncate(size)
    header.unlink()
    return disk


def test_a_raw_disk_with_a_qcow2_header_is_read_as_raw_and_the_victim_never_opened(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "tenant-b.raw"
    victim.write_bytes(b"TENANT-B-SECRET!" * (MIB // 16) * 8)
    disk = forged_raw_disk(tmp_path, victim=victim)
    # Probing would read it as qcow2 backed by the victim: the attack is real here.
    probed = subprocess.run(
        ["qemu-img", "info", "--output=json", str(disk)], capture_output=True, text=True
    )
    assert '"format": "qcow2"' in probed.stdout and str(victim) in probed.stdout

    target = CopyTarget(data=tmp_path / "backup.raw", digests=tmp_path / "backup.chunks")
    with watch_opens(victim) as watch:
        reader = QemuImageReader(str(disk), "raw")
        CopyEngine(chunk_size=MIB).copy(reader, target)
        reader.close()
    assert watch.opens == 0, "the victim's file was opened"
    assert target.data.read_bytes() == disk.read_bytes()


def test_a_backing_file_without_a_recorded_format_is_refused_before_it_is_opened(
    tmp_path: Path,
) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\1" * MIB)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top))
    # Turn the backing-format header extension (magic 0xE2792ACA, qcow2 spec
    # docs/interop/qcow2.txt) into an unknown one, which qemu ignores: no format recorded.
    data = bytearray(top.read_bytes())
    at = data.find(bytes.fromhex("E2792ACA"))
    assert at > 0
    data[at : at + 4] = bytes.fromhex("12345678")
    top.write_bytes(bytes(data))

    with watch_opens(base) as watch, pytest.raises(UnsupportedImage) as err:
        image_chain(str(top), "qcow2")
    assert watch.opens == 0
    assert "no recorded backing format" in str(err.value) and str(base) in str(err.value)
    with pytest.raises(UnsupportedImage):
        QemuImageReader(str(top), "qcow2")


def test_the_chain_carries_each_layers_recorded_format(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * MIB)
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(mid))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    chain = image_chain(str(top), "qcow2")
    assert [(layer.path, layer.format) for layer in chain] == [
        (str(top), "qcow2"),
        (str(mid), "qcow2"),
        (str(base), "raw"),
    ]
