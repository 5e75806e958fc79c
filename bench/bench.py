"""``make bench``: answer time vs time to BackedUp, and backup throughput vs cp / qemu-img.

Everything is measured in one run on this machine, against baselines measured on the same
source file in the same run, because these machines are noisy. It uses the real stack: a
Temporal dev server, libvirtd/QEMU, a host worker in-process and the backup worker as its
own process (so that its peak RSS is its own).

Usage: python bench/bench.py [--sizes-gib 1 4]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from activities.contracts import SnapshotState  # noqa: E402
from activities.settings import Settings  # noqa: E402
from workers import starter  # noqa: E402
from workers.client import connect  # noqa: E402
from workers.demo_vm import MIB, create_vm  # noqa: E402
from workers.stack import dev_server_command, free_port, terminate, wait_for_port  # noqa: E402
from workers.worker import running_workers  # noqa: E402

GIB = 1024 * MIB


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def bench_size(settings: Settings, client, conn, work: Path, size: int) -> dict:  # type: ignore[no-untyped-def]
    host = f"bench{uuid.uuid4().hex[:6]}"
    vm = create_vm(
        conn,
        name=f"sf-bench-{uuid.uuid4().hex[:6]}",
        directory=work / "primary",
        size=size,
        data_bytes=size,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "worker", "--backup", "--concurrency", "1"],
        env=dict(
            os.environ,
            SNAPFERRY_TEMPORAL_ADDRESS=settings.temporal_address,
            SNAPFERRY_SECONDARY=str(settings.secondary),
            SNAPFERRY_HOME=str(settings.home),
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        from activities.contracts import SnapshotRequest, VmRef, VolumeRef, new_snapshot_id

        req = SnapshotRequest(
            snapshot_id=new_snapshot_id(),
            volume=VolumeRef(vm=VmRef(name=vm.name, host=host), disk="vda"),
            backup=settings.backup_defaults,
        )
        async with running_workers(client, settings, hosts=[host]):
            await asyncio.sleep(1.0)  # let the backup worker process connect
            t0 = time.perf_counter()
            answer = await starter.create_snapshot(client, req)
            t_answer = time.perf_counter() - t0
            record = await starter.wait_settled(client, answer.id)
        assert record.state == SnapshotState.BACKED_UP and record.backup
        at = {t.state: t.at for t in record.transitions}
        backup_s = (at[SnapshotState.BACKED_UP] - at[SnapshotState.BACKING_UP]).total_seconds()
        rss = peak_rss_mib(worker.pid)
    finally:
        terminate(worker.pid)
    src = vm.disk
    cp_s = timed(["cp", "--sparse=always", str(src), str(work / "cp.out")])
    (work / "cp.out").unlink()
    # The fair baseline: snapferry fsyncs what it writes, plain cp does not.
    cp_sync_s = timed(
        ["sh", "-c", f"cp --sparse=always '{src}' '{work}/cp.out' && sync '{work}/cp.out'"]
    )
    conv_s = timed(
        ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(src), str(work / "conv.raw")]
    )
    conv_fast_s = timed(
        [
            "qemu-img",
            "convert",
            "-U",
            "-f",
            "qcow2",
            "-W",
            "-m",
            "16",
            "-O",
            "raw",
            str(src),
            str(work / "conv2.raw"),
        ]
    )
    for f in ("cp.out", "conv.raw", "conv2.raw"):
        (work / f).unlink()
    Path(record.backup.path).unlink()
    vm.destroy()
    return {
        "size_gib": size / GIB,
        "answer_ms": t_answer * 1000,
        "backed_up_s": (at[SnapshotState.BACKED_UP] - at[SnapshotState.CREATING]).total_seconds(),
        "backup_mbps": size / backup_s / 1e6,
        "cp_mbps": size / cp_s / 1e6,
        "cp_sync_mbps": size / cp_sync_s / 1e6,
        "convert_mbps": size / conv_s / 1e6,
        "convert_fast_mbps": size / conv_fast_s / 1e6,
        "rss_mib": rss,
    }


async def main(sizes: list[float]) -> None:
    work = Path(
        tempfile.mkdtemp(prefix="snapferry-bench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    )
    port = free_port()
    server = subprocess.Popen(
        dev_server_command(db=work / "temporal.db", host="127.0.0.1", port=port, ui_port=None),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    conn = libvirt.open("qemu:///system")
    rows = []
    try:
        wait_for_port("127.0.0.1", port)
        settings = dataclasses.replace(
            Settings.from_env(),
            home=work,
            secondary=work / "secondary",
            temporal_address=f"127.0.0.1:{port}",
        )
        client = await connect(settings)
        for gib in sizes:
            rows.append(await bench_size(settings, client, conn, work, int(gib * GIB)))
    finally:
        terminate(server.pid)
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        "| volume | answer (create) | total to BackedUp | answer / total | backup MB/s "
        "| cp MB/s | cp+sync MB/s | qemu-img convert MB/s | convert -W -m16 MB/s | backup / cp "
        "| backup / cp+sync | backup / convert | backup worker peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size_gib']:.0f} GiB random | {r['answer_ms']:.0f} ms | {r['backed_up_s']:.1f} s"
            f" | {r['answer_ms'] / 1000 / r['backed_up_s']:.3f} | {r['backup_mbps']:.0f}"
            f" | {r['cp_mbps']:.0f} | {r['cp_sync_mbps']:.0f} | {r['convert_mbps']:.0f}"
            f" | {r['convert_fast_mbps']:.0f} | {r['backup_mbps'] / r['cp_mbps']:.2f}"
            f" | {r['backup_mbps'] / r['cp_sync_mbps']:.2f}"
            f" | {r['backup_mbps'] / r['convert_mbps']:.2f}"
            f" | {r['rss_mib']:.0f} MiB |"
        )
    print(
        "\nbackup MB/s is end to end (BackingUp -> BackedUp: copy, fsync, verify re-read,"
        " rename, manifest) from the workflow's own transition times."
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--sizes-gib", type=float, nargs="+", default=[1, 4])
    args = p.parse_args()
    asyncio.run(main(args.sizes_gib))
    sys.stdout.flush()
    os._exit(0)
