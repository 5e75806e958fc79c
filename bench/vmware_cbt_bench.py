"""VMware incrementals with Changed Block Tracking: a delta's time and bytes against the full's.

``.venv/bin/python -m bench.vmware_cbt_bench [--gib 10] [--changed-mib 100]`` from the repo
root. Against tests/vsphere_sim (a separate process, real pyvmomi, real datastore HTTP): a
thin disk of ``--gib`` GiB with ``--changed-mib`` MiB of random data is taken and backed up
in full after a first take that turns CBT on (the copy engine, 8 MiB chunks, the areas
``QueryChangedDiskAreas(changeId="*")`` answers allocated, over ``/folder``); the guest
then rewrites ``--changed-mib`` MiB in 256 KiB writes at random offsets, and the next take
is backed up as a delta (QueryChangedDiskAreas, then only the changed areas, in 64 KiB
chunks). Each backup is timed from its take to its last byte on secondary, and the delta's
bytes are checked against the disk at its take. The figures are loopback against a Python
server on a shared machine: they show what the delta saves, not a vCenter's speed.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from snapferry.activities.contracts import (
    HypervisorType,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.hypervisors.vmware import VmwareDriver
from snapferry.activities.settings import Settings
from snapferry.activities.storage.copy_engine import CopyEngine, CopyTarget
from tests.simulator import vcenter_config
from tests.vsphere_sim.control import SimulatorProcess, cbt, create_vm, disk_path, guest_write

MIB = 1024 * 1024
WRITE = 256 * 1024
USER, PASSWORD = "administrator@vsphere.local", "bench"


class Entry:
    """The full backup as the delta's plan reads it (a BackupHistoryEntry)."""

    def __init__(self, snapshot_id: str, change_id: str | None, virtual_size: int) -> None:
        self.snapshot_id, self.change_id, self.depth, self.source = snapshot_id, change_id, 0, ""
        self.virtual_size = virtual_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=10.0)
    parser.add_argument("--changed-mib", type=int, default=100)
    args = parser.parse_args()
    size = int(args.gib * 1024) * MIB
    n_writes = args.changed_mib * MIB // WRITE
    rng = random.Random(20)
    with tempfile.TemporaryDirectory(prefix="vmware-cbt-bench-") as tmp:
        work = Path(tmp)
        sim = SimulatorProcess()
        port = sim.start(work / "vsphere", 0, USER, PASSWORD)
        try:
            create_vm(port, "cbt01", [size])
            with open(disk_path(work / "vsphere", "cbt01", 0), "r+b") as f:  # thin: 100 MiB
                for offset in sorted(rng.sample(range(size // MIB), args.changed_mib)):
                    f.seek(offset * MIB)
                    f.write(rng.randbytes(MIB))
            vcenter = vcenter_config(port, work, user=USER, password=PASSWORD, datacenter="dc1")
            settings = replace(Settings.from_env(), vcenter=vcenter)
            driver = VmwareDriver(settings)
            engine = CopyEngine(
                chunk_size=settings.chunk_size, checkpoint_bytes=settings.checkpoint_bytes
            )
            volume = VolumeRef(
                vm=VmRef(name="cbt01", host="vc1", hypervisor=HypervisorType.VMWARE), disk="cbt01"
            )

            # The first take turns CBT on (its snapshot starts the tracking) and records no
            # changeId; the measured full is the next one, the base of the delta.
            sid0 = new_snapshot_id()
            first = driver.take(volume=volume, snapshot_id=sid0)
            driver.release(volume=volume, snapshot_id=sid0, source=first)

            t0 = time.perf_counter()
            sid1 = new_snapshot_id()
            full_src = driver.take(volume=volume, snapshot_id=sid1)
            full_plan = driver.plan_backup(full_src, [])
            reader = driver.open_reader(full_src, full_plan)
            try:
                full = engine.copy(reader, CopyTarget(work / "full.raw", work / "full.chunks"))
            finally:
                reader.close()
            t_full = time.perf_counter() - t0
            driver.release(volume=volume, snapshot_id=sid1, source=full_src)

            written: list[tuple[int, bytes]] = []
            for slot in rng.sample(range(size // WRITE), n_writes):
                data = rng.randbytes(WRITE)
                guest_write(port, "cbt01", slot * WRITE, data)
                written.append((slot * WRITE, data))

            asked = cbt(port)["queries"]
            t0 = time.perf_counter()
            sid2 = new_snapshot_id()
            delta_src = driver.take(volume=volume, snapshot_id=sid2)
            t_take = time.perf_counter() - t0
            plan = driver.plan_backup(
                delta_src, [Entry(sid1, full_src.change_id, full_src.virtual_size)]
            )
            assert plan.parent == sid1, plan
            reader = driver.open_reader(delta_src, plan)
            try:
                listed = list(reader.data_extents())
                delta = engine.with_chunk_size(64 * 1024).copy(
                    reader, CopyTarget(work / "delta.raw", work / "delta.chunks"), extents=listed
                )
            finally:
                reader.close()
            t_delta = time.perf_counter() - t0
            queries = cbt(port)["queries"] - asked
            with open(work / "delta.raw", "rb") as f:
                for offset, data in written:
                    f.seek(offset)
                    assert f.read(len(data)) == data, f"delta differs at {offset}"
            driver.release(volume=volume, snapshot_id=sid2, source=delta_src)
        finally:
            sim.stop()

    changed = n_writes * WRITE
    print(
        f"VMware CBT: a {size / (1024 * MIB):g} GiB thin disk, {changed // MIB} MiB changed"
        f" ({changed / size:.2%}) in {n_writes} writes of {WRITE // 1024} KiB"
    )
    print(
        f"  full : {t_full:7.2f} s  {full.bytes_copied / MIB:9.1f} MiB read"
        f"  ({full.bytes_copied / t_full / 1e6:.0f} MB/s)"
    )
    print(
        f"  delta: {t_delta:7.2f} s  {delta.bytes_copied / MIB:9.1f} MiB read"
        f"  in {len(listed)} areas, {queries} QueryChangedDiskAreas (take {t_take:.2f} s)"
    )
    print(
        f"  delta/full: time {t_delta / t_full:.3f},"
        f" bytes {delta.bytes_copied / full.bytes_copied:.4f}"
        f"; delta bytes / changed bytes {delta.bytes_copied / changed:.3f}"
    )


if __name__ == "__main__":
    main()
