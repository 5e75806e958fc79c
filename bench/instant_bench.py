"""Instant restore: from ``snapshot run`` to a running VM, against the backup's size.

For each size, a disk that really boots (tests/integration/bootable_guest.py: SeaBIOS,
SYSLINUX, Debian's kernel, busybox, qemu-ga; the rest of the disk an ext4 partition) is
backed up with snapferry's copy engine into a plain-file backup (bench/restore_bench.py's
``plain_backup``), and the KVM driver's instant restore runs a new VM from it on the real
libvirtd: the seconds until the VM runs (export, overlay, definition, start), until its
guest agent answers (it booted through the export), and until the block pull has copied
the backup in. The goal is a running VM in under 10 s for an 8 GiB backup, independent of
size; the copy's time grows with the data, not the virtual size.

Usage: python bench/instant_bench.py [--sizes-gib 0.0625 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from restore_bench import plain_backup  # noqa: E402

from snapferry.activities.contracts import (  # noqa: E402
    InstantRunRequest,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.hypervisors.kvm import KvmDriver  # noqa: E402
from snapferry.activities.hypervisors.kvm.export_vm import agent_answers  # noqa: E402
from snapferry.activities.settings import Settings  # noqa: E402
from tests.integration.bootable_guest import build_bootable_disk  # noqa: E402

GIB = 1024**3


def bench_size(conn, work: Path, size: int) -> dict:  # type: ignore[no-untyped-def]
    import libvirt

    work.mkdir(parents=True)
    raw = build_bootable_disk(work / "disk.raw", {"data/one.bin": b"x" * 1024 * 1024}, size=size)
    manifest = plain_backup(raw, work / "secondary")
    name = f"sf-bench-instant-{size // (1024 * 1024)}m"
    req = InstantRunRequest(
        snapshot_id=new_snapshot_id(),
        volume=VolumeRef(vm=VmRef(name="sf-bench-no-such-vm", host="local"), disk="vda"),
        manifest_path=str(manifest),
        primary_dir=str(work),
        name=name,
    )
    driver = KvmDriver(dataclasses.replace(Settings.from_env(), home=work))
    try:
        t0 = time.perf_counter()
        driver.run_instant(req, work=work / "instant")
        running = time.perf_counter() - t0
        dom = conn.lookupByName(name)
        while not agent_answers(dom):
            if time.perf_counter() - t0 > 180:
                raise TimeoutError("the instant VM did not boot")
            time.sleep(0.1)
        booted = time.perf_counter() - t0
        t1 = time.perf_counter()
        driver.copy_instant(req, work=work / "instant", progress=lambda d, e: None)
        copied = time.perf_counter() - t1
        return {"size": size, "running_s": running, "booted_s": booted, "copy_s": copied}
    finally:
        try:
            dom = conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass


def print_instant(rows: list[dict]) -> None:
    print(
        "\n| backup (bootable disk, plain-file store) | VM running (export, overlay,"
        " define, start) | guest agent answers | block pull (copy in) |"
    )
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size'] / GIB:g} GiB | {r['running_s']:.2f} s | {r['booted_s']:.1f} s"
            f" | {r['copy_s']:.1f} s |"
        )
    worst = max(r["running_s"] for r in rows)
    print(f"running in under 10 s at every size: {worst < 10} (worst {worst:.2f} s)")


def main() -> None:
    import libvirt

    p = argparse.ArgumentParser()
    p.add_argument("--sizes-gib", type=float, nargs="+", default=[0.0625, 8])
    args = p.parse_args()
    conn = libvirt.open("qemu:///system")
    rows = []
    with tempfile.TemporaryDirectory(prefix="snapferry-instant-", dir="/var/tmp") as tmp:
        for i, gib in enumerate(args.sizes_gib):
            rows.append(bench_size(conn, Path(tmp) / str(i), int(gib * GIB)))
    conn.close()
    print_instant(rows)


if __name__ == "__main__":
    main()
