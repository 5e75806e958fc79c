"""KVM incremental backups: a delta's size and time against the full's.

A 4 GiB volume holding 2 GiB of random data is backed up in full; the guest then rewrites
1 % of the volume (64 KiB writes at random cluster-aligned offsets, through the running VM's
block layer); the next snapshot's backup is a delta. Both are timed from the ``create`` call
to BackedUp by the workflow's own clock (take, backup child, copy, verify, manifest:
orchestration included), and their stored bytes are read from the files on secondary. Both
restores are checked against the disk's bytes at their time.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapferry.activities.contracts import SnapshotRecord, SnapshotState
from snapferry.activities.settings import Settings
from snapferry.activities.storage.secondary import SecondaryStore
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB, create_vm
from snapferry.workers.stack import terminate
from snapferry.workers.worker import running_workers

CLUSTER = 64 * 1024
GIB = 1024 * MIB


def identical(expected: Path, record: SnapshotRecord) -> bool:
    assert record.backup is not None
    manifest = SecondaryStore.read_manifest(Path(record.backup.manifest_path))
    with SecondaryStore.materialized(manifest) as raw:
        proc = subprocess.run(
            ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(expected), str(raw)]
        )
    return proc.returncode == 0


async def bench_delta(
    settings: Settings,
    client: Any,
    conn: Any,
    work: Path,
    *,
    start_backup_worker: Callable[..., subprocess.Popen],
    snapshot_request: Callable[..., Any],
) -> dict:
    size, data = 4 * GIB, 2 * GIB
    vm = create_vm(
        conn,
        name=f"sf-bench-{uuid.uuid4().hex[:6]}",
        directory=work / "primary",
        size=size,
        data_bytes=data,
    )
    host = f"bench{uuid.uuid4().hex[:6]}"
    worker = start_backup_worker(settings)
    now = work / "delta-now.raw"
    phases: dict[str, dict[str, float]] = {}
    try:
        assert vm.reference is not None
        shutil.copyfile(vm.reference, now)

        async def backed_up() -> tuple[SnapshotRecord, float]:
            answer = await starter.create_snapshot(
                client, snapshot_request(settings, vm.name, host)
            )
            record = await starter.wait_settled(client, answer.id, timeout=3600)
            assert record.state == SnapshotState.BACKED_UP and record.backup and record.created
            at = {t.state: t.at for t in record.transitions}
            phases[record.id] = {
                "take": (at[SnapshotState.CREATED_ON_PRIMARY] - record.created).total_seconds(),
                "to backup": (
                    at[SnapshotState.BACKING_UP] - at[SnapshotState.CREATED_ON_PRIMARY]
                ).total_seconds(),
                "backup": (
                    at[SnapshotState.BACKED_UP] - at[SnapshotState.BACKING_UP]
                ).total_seconds(),
                "of which verify": record.backup.verify_seconds,
            }
            return record, (at[SnapshotState.BACKED_UP] - record.created).total_seconds()

        async with running_workers(client, settings, hosts=[host]):
            await asyncio.sleep(1.0)  # let the backup worker process connect
            full, full_s = await backed_up()
            at_full = work / "delta-full.raw"
            shutil.copyfile(now, at_full)
            rng = random.Random(14)
            clusters = rng.sample(range(size // CLUSTER), size // CLUSTER // 100)
            with open(now, "r+b") as ref:
                for n in clusters:
                    pattern = rng.randrange(1, 256)
                    vm.guest_write(pattern=pattern, offset=n * CLUSTER, length=CLUSTER)
                    ref.seek(n * CLUSTER)
                    ref.write(bytes([pattern]) * CLUSTER)
            delta, delta_s = await backed_up()
        assert full.backup and delta.backup
        assert delta.backup.parent == full.id, delta.backup
        full_ok, delta_ok = identical(at_full, full), identical(now, delta)
        full_bytes = os.stat(full.backup.path).st_blocks * 512
        delta_bytes = os.stat(delta.backup.path).st_blocks * 512
    finally:
        terminate(worker.pid)
        vm.destroy()
        for p in (now, work / "delta-full.raw"):
            p.unlink(missing_ok=True)
    return {
        "changed_mib": len(clusters) * CLUSTER / MIB,
        "full_s": full_s,
        "delta_s": delta_s,
        "full_mib": full_bytes / MIB,
        "delta_mib": delta_bytes / MIB,
        "restores_exact": full_ok and delta_ok,
        "full_phases": phases[full.id],
        "delta_phases": phases[delta.id],
    }


def print_delta(r: dict) -> None:
    for kind in ("full", "delta"):
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in r[f"{kind}_phases"].items())
        print(f"{kind}: {parts}")
    print(
        "\n| KVM backup of a 4 GiB volume, 2 GiB random data | create -> BackedUp | stored |\n"
        "|---|---|---|\n"
        f"| full | {r['full_s']:.2f} s | {r['full_mib']:.0f} MiB |\n"
        f"| delta after a 1 % guest change ({r['changed_mib']:.0f} MiB) | {r['delta_s']:.2f} s"
        f" | {r['delta_mib']:.1f} MiB |"
    )
    print(
        f"\ndelta / full: {r['delta_mib'] / r['full_mib']:.2%} of the bytes (at most 3 %),"
        f" {r['delta_s'] / r['full_s']:.1%} of the time (at most 10 %); both restore"
        f" byte-identical: {r['restores_exact']}"
    )
