"""Throughput of the VMware DatastoreReader against this simulator.

``python -m tests.vsphere_sim.bench_reader [--gib 1] [--rounds 3]`` from the repo root:
one VM with a disk of random data, read end to end in the copy engine's 8 MiB chunks
with ``window=8 MiB`` (one ranged GET per chunk over a kept-alive connection: what the
reader did before) and with the default window (one GET per GiB), rounds alternating.
The figures are loopback against a Python server on a noisy machine: they show what the
per-chunk request costs here, not what a vCenter's would (each of its GETs is
authenticated and proxied to an ESXi host).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from snapferry.activities.hypervisors.vmware import DatastoreReader, VmwareDriver
from snapferry.activities.settings import Settings

from ..simulator import vcenter_config
from .control import SimulatorProcess, create_vm, disk_path, folder_stats

MIB = 1024 * 1024
CHUNK = 8 * MIB
USER, PASSWORD = "administrator@vsphere.local", "bench"


def read_through(reader: DatastoreReader, buf: bytearray) -> float:
    (extent,) = reader.data_extents()
    view = memoryview(buf)
    t0 = time.perf_counter()
    for offset in range(0, reader.virtual_size, CHUNK):
        n = min(CHUNK, reader.virtual_size - offset)
        reader.read_range(extent, offset, view[:n])
    took = time.perf_counter() - t0
    reader.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = int(args.gib * 1024) * MIB
    with tempfile.TemporaryDirectory(prefix="vsphere-bench-") as tmp:
        sim = SimulatorProcess()
        port = sim.start(Path(tmp) / "vsphere", 0, USER, PASSWORD)
        try:
            create_vm(port, "bench01", [size], power="poweredOff")
            with open(disk_path(Path(tmp) / "vsphere", "bench01", 0), "r+b") as f:
                for _ in range(size // (64 * MIB)):
                    f.write(os.urandom(64 * MIB))
            vcenter = vcenter_config(
                port, Path(tmp), user=USER, password=PASSWORD, datacenter="dc1"
            )
            driver = VmwareDriver(replace(Settings.from_env(), vcenter=vcenter))
            buf = bytearray(CHUNK)
            results: dict[str, list[float]] = {"per-chunk GET (8 MiB)": [], "1 GiB window": []}
            gets: dict[str, int] = {}
            for _ in range(args.rounds):
                for label, window in (("per-chunk GET (8 MiB)", CHUNK), ("1 GiB window", 0)):
                    folder_stats(port)
                    reader = DatastoreReader(
                        driver.session, "ds1", "bench01/bench01-flat.vmdk", size, window=window
                    )
                    results[label].append(size / read_through(reader, buf) / 1e6)
                    gets[label] = folder_stats(port)["gets"]
            print(f"reading {size // MIB} MiB of random data in 8 MiB chunks, {args.rounds} rounds")
            for label, rates in results.items():
                print(
                    f"  {label:22s} {gets[label]:4d} GETs  median {statistics.median(rates):6.0f}"
                    f" MB/s  (runs: {', '.join(f'{r:.0f}' for r in rates)})"
                )
        finally:
            sim.stop()


if __name__ == "__main__":
    main()
