"""A backup attempt publishes its manifest only if the snapshot's layer on primary is still
the snapshot when it finishes: a stale attempt (cut off, cancelled, its retry or a delete
already moving) that read while a delete marked the layer released and merged below it
must fail with SourceGone and leave no backup behind. Real qcow2 files, the real KVM
driver's check, the backup activity's own blocking copy."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from snapferry.activities.backup import BackupActivities, _Watch
from snapferry.activities.contracts import (
    CopyRequest,
    PrimarySnapshot,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import SourceGone
from snapferry.activities.hypervisors.kvm import OVERLAY_TAG, RELEASED_SUFFIX
from snapferry.activities.settings import Settings
from snapferry.activities.storage.copy_engine import StopFlag

MIB = 1024 * 1024


def qcow2_snapshot(tmp: Path, snapshot_id: str) -> PrimarySnapshot:
    """A frozen qcow2 image with data and the overlay a take puts above it."""
    image = tmp / "web01.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(image)],
        check=True,
        capture_output=True,
    )
    overlay = tmp / f"web01{OVERLAY_TAG}{snapshot_id}.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(image),
            "-F",
            "qcow2",
            str(overlay),
        ],
        check=True,
    )
    return PrimarySnapshot(
        image=str(image),
        image_format="qcow2",
        overlay=str(overlay),
        virtual_size=8 * MIB,
        vm_was_running=False,
    )


@pytest.fixture
def activities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SNAPFERRY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPFERRY_SECONDARY", str(tmp_path / "secondary"))
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        yield BackupActivities(Settings.from_env(), executor=executor)
    finally:
        executor.shutdown()


def request_for(source: PrimarySnapshot, snapshot_id: str) -> CopyRequest:
    return CopyRequest(
        snapshot_id=snapshot_id,
        volume=VolumeRef(vm=VmRef(name="web01", host="h1", hypervisor="kvm"), disk="vda"),
        source=source,
    )


def released_while_reading(acts: BackupActivities, req: CopyRequest) -> None:
    """The delete's release arrives while this attempt is still reading: the overlay is
    marked released once the reader has read everything, before the attempt finalizes."""
    driver = acts.drivers.get(req.volume.vm.hypervisor)
    real_open = driver.open_reader

    def open_reader(source, plan):  # type: ignore[no-untyped-def]
        reader = real_open(source, plan)
        real_close = reader.close

        def close() -> None:
            real_close()
            Path(str(source.overlay) + RELEASED_SUFFIX).touch()

        reader.close = close  # type: ignore[method-assign]
        return reader

    driver.open_reader = open_reader  # type: ignore[method-assign]


def test_a_stale_attempt_whose_layer_was_released_publishes_nothing(
    tmp_path: Path, activities: BackupActivities
) -> None:
    sid = new_snapshot_id()
    source = qcow2_snapshot(tmp_path, sid)
    req = request_for(source, sid)
    released_while_reading(activities, req)
    with pytest.raises(SourceGone, match="merged away or deleted") as gone:
        activities._copy(req, None, _Watch(None), StopFlag(), 1.0)
    assert gone.value.non_retryable
    store = activities.store
    assert not store.manifest_path(req.volume, sid).exists()
    assert not store.image_path(req.volume, sid).exists()
    partial = store.partial_target(req.volume, sid)
    assert not partial.data.exists() and not partial.digests.exists()


def test_an_attempt_whose_layer_is_intact_publishes_its_backup(
    tmp_path: Path, activities: BackupActivities
) -> None:
    sid = new_snapshot_id()
    source = qcow2_snapshot(tmp_path, sid)
    req = request_for(source, sid)
    activities._copy(req, None, _Watch(None), StopFlag(), 1.0)
    manifest = activities.store.read_manifest(activities.store.manifest_path(req.volume, sid))
    data = Path(manifest.path).read_bytes()
    assert data == bytes(MIB) + b"\x5a" * (2 * MIB) + bytes(5 * MIB)
