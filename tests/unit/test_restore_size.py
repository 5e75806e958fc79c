"""A restore rebuilt from a delta chain is exactly the snapshot's size and bytes, also when a
backup in the middle of the chain was taken while the volume was larger (a resize, then a
revert to a snapshot from before it)."""

from __future__ import annotations

import os
from pathlib import Path

from snapferry.activities.contracts import BackupPlan, VmRef, VolumeRef, new_snapshot_id
from snapferry.activities.storage.copy_engine import CopyEngine
from snapferry.activities.storage.reader import DataExtent
from snapferry.activities.storage.secondary import SecondaryStore

GIB = 1024 * 1024 * 1024
MIB = 1024 * 1024
VOLUME = VolumeRef(vm=VmRef(name="web01", host="h1", hypervisor="kvm"), disk="vda")


def pattern(offset: int, length: int, tag: int) -> bytes:
    """Bytes that name their backup (``tag``) and their offset, so a misplaced or stale
    range cannot pass for the right one."""
    block = tag.to_bytes(1, "little") + (offset // 4096).to_bytes(7, "little")
    return (block * (length // 8 + 1))[:length]


class WritesReader:
    """A sparse disk of ``size`` bytes holding ``writes`` (offset -> bytes); its extents
    are the written ranges, as a delta's would be."""

    def __init__(self, size: int, writes: dict[int, bytes]) -> None:
        self.virtual_size = size
        self.writes = dict(sorted(writes.items()))

    def data_extents(self) -> list[DataExtent]:
        return [
            DataExtent(start=o, length=len(b), path="mem", host_offset=o)
            for o, b in self.writes.items()
        ]

    def read_range(self, extent: DataExtent, guest_offset: int, view: memoryview) -> None:
        data = self.writes[extent.start]
        lo = guest_offset - extent.start
        view[:] = data[lo : lo + len(view)]

    def close(self) -> None:
        pass


def backed_up(
    store: SecondaryStore, size: int, writes: dict[int, bytes], parent: str | None
) -> str:
    """One finished backup through the real engine and the store's own finalize."""
    sid = new_snapshot_id()
    reader = WritesReader(size, writes)
    target = store.target(VOLUME, sid)
    outcome = CopyEngine(chunk_size=64 * 1024).copy(reader, target)
    plan = BackupPlan(parent=parent, base_image="base" if parent else None, depth=0)
    extents = None if parent is None else [(o, len(b)) for o, b in reader.writes.items()]
    store.finalize(
        volume=VOLUME,
        snapshot_id=sid,
        target=target,
        outcome=outcome,
        source="/primary/web01.qcow2",
        source_format="qcow2",
        plan=plan,
        extents=extents,
    )
    return sid


def test_a_restore_is_clamped_to_the_snapshot_size_through_a_larger_delta(
    tmp_path: Path,
) -> None:
    store = SecondaryStore(tmp_path)
    full_writes = {0: pattern(0, MIB, 1), GIB - MIB: pattern(GIB - MIB, MIB, 1)}
    full = backed_up(store, GIB, full_writes, None)
    # Taken after the volume grew to 2 GiB: one extent straddles the old end, one lies
    # wholly past it.
    grown = {
        GIB - 64 * 1024: pattern(GIB - 64 * 1024, 128 * 1024, 2),
        GIB + GIB // 2: pattern(GIB + GIB // 2, MIB, 2),
    }
    middle = backed_up(store, 2 * GIB, grown, full)
    # After a revert to the 1 GiB snapshot: 1 GiB again, one change.
    last_writes = {100 * MIB: pattern(100 * MIB, MIB, 3)}
    last = backed_up(store, GIB, last_writes, middle)

    manifest = store.read_manifest(store.manifest_path(VOLUME, last))
    assert manifest.virtual_size == GIB
    with SecondaryStore.materialized(manifest) as image:
        assert os.stat(image).st_size == GIB
        expected: dict[int, bytes] = {}
        for writes in (full_writes, grown, last_writes):
            for offset, data in writes.items():
                for k in range(0, len(data), 4096):
                    if offset + k < GIB:
                        expected[offset + k] = data[k : k + 4096]
        with open(image, "rb") as f:
            for offset in range(0, GIB, 4096):
                block = f.read(4096)
                assert block == expected.get(offset, bytes(4096)), f"at {offset}"
