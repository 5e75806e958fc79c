"""The qemu-img map reader on real images, and the alert log line."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from snapferry.activities.alerts import alert_logger, format_alert
from snapferry.activities.contracts import Alert
from snapferry.activities.errors import ImageUnreadable, UnsupportedImage
from snapferry.activities.settings import Settings
from snapferry.activities.storage.copy_engine import CopyEngine, CopyTarget
from snapferry.activities.storage.reader import QemuImageReader

MIB = 1024 * 1024


def qemu_io(image: Path, cmd: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", cmd, str(image)], check=True, capture_output=True
    )


def test_reader_follows_a_backing_chain_and_reports_only_data(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    qemu_io(base, "write -P 0x11 0 2M")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)],
        check=True,
    )
    qemu_io(top, "write -P 0x22 1M 1M")
    qemu_io(top, "write -z 8M 1M")  # zero clusters are not data
    reader = QemuImageReader(str(top), "qcow2")
    extents = list(reader.data_extents())
    assert sum(e.length for e in extents) == 2 * MIB
    assert {e.path for e in extents} == {str(base), str(top)}

    target = CopyTarget(data=tmp_path / "out.raw", digests=tmp_path / "out.chunks")
    CopyEngine(chunk_size=MIB).copy(reader, target)
    reader.close()
    expected = tmp_path / "expected.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(top), str(expected)], check=True
    )
    assert target.data.read_bytes() == expected.read_bytes()


def test_compressed_clusters_are_refused_not_misread(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"abc" * 100000)
    comp = tmp_path / "c.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-c", "-O", "qcow2", str(raw), str(comp)], check=True
    )
    with pytest.raises(UnsupportedImage, match="compressed"):
        QemuImageReader(str(comp), "qcow2").data_extents()


def test_missing_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageUnreadable, match="qemu-img info"):
        QemuImageReader(str(tmp_path / "nope.qcow2"), "qcow2")


def test_alert_is_one_line_in_management_server_log(tmp_path: Path) -> None:
    settings = dataclasses.replace(Settings.from_env(), alert_log=tmp_path / "ms.log")
    alert = Alert(
        event="SNAPSHOT.BACKUP.FAILED",
        snapshot_id="0" * 8 + "-0000-0000-0000-" + "0" * 12,
        vm="vm1",
        disk="vda",
        message="store gone\nsecond line",
    )
    alert_logger(settings).error(format_alert(alert))
    for h in alert_logger(settings).handlers:
        h.flush()
    lines = (tmp_path / "ms.log").read_text().splitlines()
    assert len(lines) == 1
    assert "ERROR [snapferry] SNAPSHOT.BACKUP.FAILED snapshot_id=" in lines[0]
    assert "vm=vm1 disk=vda store gone second line" in lines[0]


def test_the_map_is_streamed_in_windows_with_the_same_extents(tmp_path: Path) -> None:
    img = tmp_path / "thin.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    for i, off in enumerate((0, 3, 17, 18, 40, 63)):
        qemu_io(img, f"write -P {i + 1} {off}M 512k")
    whole = QemuImageReader(str(img), "qcow2")
    whole._window = 1 << 40
    expected = list(whole.data_extents())
    windowed = QemuImageReader(str(img), "qcow2")
    windowed._window = 1 << 20  # 1 MiB windows: 64 qemu-img map calls, one window each
    calls: list[tuple[int, int]] = []
    original = windowed._map_window

    def spy(offset: int, length: int):  # type: ignore[no-untyped-def]
        calls.append((offset, length))
        return original(offset, length)

    windowed._map_window = spy  # type: ignore[method-assign]
    extents = windowed.data_extents()
    assert len(calls) == 1  # lazily: only the first window is mapped before iterating
    got = list(extents)
    assert len(calls) > 1
    assert [(e.start, e.length) for e in got] == [(e.start, e.length) for e in expected]
    assert sum(e.length for e in got) == 6 * 512 * 1024
