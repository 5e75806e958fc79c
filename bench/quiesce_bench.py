"""The freeze window of a quiesced KVM take, against the volume's size.

A quiesced take freezes the guest's file systems through the QEMU guest agent for the
external snapshot, and the guest's writes wait meanwhile: that window is what a database
feels, and it should not grow with the disk (the snapshot is an overlay, whatever the size).
For each size, a real guest (tests/integration/agent_guest.py: Debian's kernel, busybox,
qemu-ga, a writer that never fsyncs, a hook that stops it and appends a marker) is booted on
an ext4 disk of that size, and the bench times takes with ``--quiesce`` and without, through
the KVM driver on the real libvirtd, in the same run:

- the freeze window: the hook's ``freeze`` to its ``thaw``, in the guest's clock (10 ms);
- the take's wall time, quiesced and crash-consistent, and their ratio.

Usage: python bench/quiesce_bench.py [--sizes-gib 0.0625 1 8] [--takes 3]
(also run by ``make bench`` through bench/bench.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapferry.activities.contracts import (  # noqa: E402
    Consistency,
    Quiesce,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.hypervisors.kvm import KvmDriver  # noqa: E402
from snapferry.activities.hypervisors.kvm.export_vm import agent_answers  # noqa: E402
from snapferry.activities.settings import Settings  # noqa: E402
from tests.integration import agent_guest as ag  # noqa: E402
from tests.integration.guest import boot, define_guest, find_kernel  # noqa: E402

GIB = 1024**3


def _times(guest, pattern) -> list[float]:  # type: ignore[no-untyped-def]
    return [float(m.group(1)) for line in guest.lines() if (m := pattern.fullmatch(line))]


def bench_size(conn, work: Path, size: int, takes: int) -> dict:  # type: ignore[no-untyped-def]
    kernel, version = find_kernel()
    work.mkdir(parents=True, exist_ok=True)
    initrd = ag.build_agent_initramfs(work / f"initrd-{size}", version)
    guest = define_guest(
        conn,
        directory=work / "primary",
        initrd=initrd,
        kernel=kernel,
        disk_size=size,
        cmdline=ag.cmdline(),
        agent=True,
    )
    driver = KvmDriver(dataclasses.replace(Settings.from_env(), home=work))
    ref = VolumeRef(vm=VmRef(name=guest.name, host="local"), disk="vda")
    try:
        boot(guest, timeout=120)
        deadline = time.monotonic() + 60
        while not agent_answers(guest.domain):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the agent never answered:\n{guest.tail()}")
            time.sleep(0.1)
        quiesced, crash = [], []
        for _ in range(takes):
            for mode, into in ((Quiesce.YES, quiesced), (Quiesce.NO, crash)):
                t0 = time.perf_counter()
                taken = driver.take(volume=ref, snapshot_id=new_snapshot_id(), quiesce=mode)
                into.append(time.perf_counter() - t0)
                want = Consistency.APPLICATION if mode == Quiesce.YES else Consistency.CRASH
                assert taken.consistency == want, taken
                time.sleep(0.5)  # the writer writes between takes
        freezes, thaws = _times(guest, ag.FREEZE_RE), _times(guest, ag.THAW_RE)
        assert len(freezes) == takes, guest.tail()
        windows = [min(t for t in thaws if t >= f) - f for f in freezes]
        return {
            "size": size,
            "window_max_s": max(windows),
            "window_median_s": statistics.median(windows),
            "quiesced_s": statistics.median(quiesced),
            "crash_s": statistics.median(crash),
        }
    finally:
        guest.destroy()
        initrd.unlink(missing_ok=True)


def bench_quiesce(conn, work: Path, sizes: list[int], takes: int = 3) -> list[dict]:  # type: ignore[no-untyped-def]
    return [bench_size(conn, work, size, takes) for size in sizes]


def print_quiesce(rows: list[dict]) -> None:
    print(
        "\n| disk (ext4, real guest + qemu-ga) | freeze window, median / max (guest clock)"
        " | take quiesced | take crash-consistent | quiesced / crash |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        size = f"{r['size'] / GIB:g} GiB"
        print(
            f"| {size} | {r['window_median_s'] * 1000:.0f} / {r['window_max_s'] * 1000:.0f} ms"
            f" | {r['quiesced_s'] * 1000:.0f} ms | {r['crash_s'] * 1000:.0f} ms"
            f" | {r['quiesced_s'] / r['crash_s']:.2f} |"
        )
    worst = max(r["window_max_s"] for r in rows)
    print(f"freeze window under 1 s at every size: {worst < 1.0} (worst {worst * 1000:.0f} ms)")


def main() -> None:
    import libvirt

    p = argparse.ArgumentParser()
    p.add_argument("--sizes-gib", type=float, nargs="+", default=[0.0625, 1, 8])
    p.add_argument("--takes", type=int, default=3)
    args = p.parse_args()
    conn = libvirt.open("qemu:///system")
    with tempfile.TemporaryDirectory(prefix="snapferry-quiesce-", dir="/var/tmp") as tmp:
        rows = bench_quiesce(conn, Path(tmp), [int(g * GIB) for g in args.sizes_gib], args.takes)
    conn.close()
    print_quiesce(rows)


if __name__ == "__main__":
    main()
