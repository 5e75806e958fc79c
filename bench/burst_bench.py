"""Answers under a burst: 36 creates sent at once over 12 running KVM VMs on one host.

A management server back after an outage, or a policy tick over many VMs, sends every
create at once. Each caller waits for its answer (the record in CreatedOnPrimary, returned
by the ``create`` call itself); the backups come later. This bench times that answer for
every create of the burst (3 per VM) against one create alone on the same stack, in the same
run (these machines are noisy), and prints p50, p99 and max and their ratio to one alone.

The stack is the real one: a Temporal dev server, libvirtd/QEMU with 12 running TCG
domains (64 MiB, looping in the BIOS, thin qcow2 disks), and the host worker as its own
process (``snapferry worker --host``), as a host agent runs, so that the callers in this
process do not share its event loop. No backup worker runs: the answer is what is measured,
and backups on their own pool do not take the host worker's slots.

Where the time goes is read from each snapshot's workflow history: the update's arrival
until the take is scheduled (workflow task), scheduled until a host worker starts it (the
host worker's free slots), the take itself (lock wait included), and its end until the
answer (workflow task and update completion).

Usage: python bench/burst_bench.py [--vms 12] [--per-vm 3] [--rounds 2]
(also run by ``make bench`` through bench/bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapferry.activities.contracts import (  # noqa: E402
    SnapshotRequest,
    SnapshotState,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.names import TAKE_SNAPSHOT  # noqa: E402
from snapferry.activities.settings import Settings  # noqa: E402
from snapferry.workers import starter  # noqa: E402
from snapferry.workers.demo_vm import MIB, DemoVm, create_thin_vm  # noqa: E402
from snapferry.workers.stack import (  # noqa: E402
    terminate,
)
from snapferry.workflows.routing import snapshot_workflow_id  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (no interpolation: p99 of 36 answers is the slowest)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


def cpu_seconds(pid: int, *, children: bool = True) -> float:
    """User + system CPU of a process (and of its reaped children: qemu-img), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = fields[11:15] if children else fields[11:13]
    return sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """Busy CPU of the whole machine (every core, everyone's), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def start_host_worker(settings: Settings, host: str, log: Path) -> subprocess.Popen:
    """The host worker as its own process, as on a real host; it also serves workflows."""
    out = open(log, "ab")  # noqa: SIM115 (the child keeps it; closed when it ends)
    return subprocess.Popen(
        [sys.executable, "-m", "snapferry.workers.cli", "worker", "--host", host],
        env=dict(
            os.environ,
            SNAPFERRY_TEMPORAL_ADDRESS=settings.temporal_address,
            SNAPFERRY_SECONDARY=str(settings.secondary),
            SNAPFERRY_HOME=str(settings.home),
        ),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


async def wait_ready(log: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"host worker exited ({proc.returncode}): {log.read_text()}")
        if "worker ready" in log.read_text(errors="replace"):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"host worker not ready after {timeout:.0f} s: {log.read_text()}")


async def one_create(client: Any, vm: str, host: str) -> tuple[float, str]:
    """One create through the management API; seconds until it returned, and the ID."""
    req = SnapshotRequest(
        snapshot_id=new_snapshot_id(), volume=VolumeRef(vm=VmRef(name=vm, host=host), disk="vda")
    )
    t0 = time.perf_counter()
    answer = await starter.create_snapshot(client, req)
    seconds = time.perf_counter() - t0
    if answer.state != SnapshotState.CREATED_ON_PRIMARY:
        raise RuntimeError(f"{vm}: answered {answer.state}, not CreatedOnPrimary: {answer}")
    return seconds, answer.id


async def phases(client: Any, snapshot_id: str) -> dict[str, float]:
    """The take's path through Temporal, from the snapshot's workflow history (seconds)."""
    from temporalio.api.enums.v1 import EventType

    history = await client.get_workflow_handle(snapshot_workflow_id(snapshot_id)).fetch_history()
    at: dict[str, float] = {}
    take_scheduled: int | None = None
    for e in history.events:
        t = e.event_time.ToDatetime().timestamp()
        kind = e.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            at["update"] = t  # update-with-start: the create's arrival
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED and "wft_started" not in at:
            at["wft_started"] = t
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED and "wft_done" not in at:
            at["wft_done"] = t
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED and take_scheduled is None:
            if e.activity_task_scheduled_event_attributes.activity_type.name == TAKE_SNAPSHOT:
                take_scheduled = e.event_id
                at["scheduled"] = t
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attrs = e.activity_task_started_event_attributes
            if attrs.scheduled_event_id == take_scheduled and "started" not in at:
                at["started"] = t
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attrs = e.activity_task_completed_event_attributes
            if attrs.scheduled_event_id == take_scheduled:
                at["completed"] = t
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
            at.setdefault("answered", t)
    return {
        "first workflow task queued": at["wft_started"] - at["update"],
        "first workflow task ran": at["wft_done"] - at["wft_started"],
        "to schedule": at["scheduled"] - at["update"],
        "queued for a slot": at["started"] - at["scheduled"],
        "take": at["completed"] - at["started"],
        "to answer": at["answered"] - at["completed"],
    }


async def bench_burst(
    settings: Settings,
    client: Any,
    conn: Any,
    work: Path,
    *,
    vms: int = 12,
    per_vm: int = 3,
    rounds: int = 2,
    alone: int = 5,
    server_pid: int | None = None,
) -> dict:
    """Time the burst's answers against one create alone, on one host worker process."""
    host = f"burst{uuid.uuid4().hex[:6]}"
    made: list[DemoVm] = []
    log = work / f"host-worker-{host}.log"
    worker: subprocess.Popen | None = None
    try:
        for i in range(vms):
            made.append(
                create_thin_vm(
                    conn,
                    name=f"sf-burst-{uuid.uuid4().hex[:6]}-{i}",
                    directory=work / "primary",
                    size=64 * MIB,
                    writes=[(0, MIB, i % 250 + 1)],
                )
            )
        worker = start_host_worker(settings, host, log)
        await wait_ready(log, worker)
        await asyncio.sleep(1.0)  # its pollers reach the server
        # Warm up: the worker's libvirt connection, each VM's first take.
        for vm in made:
            await one_create(client, vm.name, host)
        alone_s = []
        for i in range(alone):
            seconds, _ = await one_create(client, made[i % vms].name, host)
            alone_s.append(seconds)
        answers: list[float] = []
        ids: list[str] = []
        per_round = []
        libvirtd = int(Path("/run/libvirtd.pid").read_text())
        pid = worker.pid

        def cpu() -> dict[str, float]:
            spent = {
                "host worker (Python)": cpu_seconds(pid, children=False),
                "host worker's qemu-img": cpu_seconds(pid) - cpu_seconds(pid, children=False),
                "libvirtd": cpu_seconds(libvirtd),
                "machine": machine_cpu_seconds(),
            }
            if server_pid is not None:
                spent["Temporal dev server"] = cpu_seconds(server_pid)
            return spent

        cpu_spent: dict[str, float] = {}
        for _ in range(rounds):
            before = cpu()
            jobs = [one_create(client, vm.name, host) for _ in range(per_vm) for vm in made]
            t0 = time.perf_counter()
            results = await asyncio.gather(*jobs)
            per_round.append(
                {
                    "wall_s": time.perf_counter() - t0,
                    "p50_s": percentile([s for s, _ in results], 50),
                    "max_s": max(s for s, _ in results),
                }
            )
            after = cpu()
            for k in after:
                cpu_spent[k] = cpu_spent.get(k, 0.0) + after[k] - before[k]
            answers += [s for s, _ in results]
            ids += [i for _, i in results]
            await asyncio.sleep(0.5)
        breakdown = [await phases(client, i) for i in ids]
    finally:
        if worker is not None:
            terminate(worker.pid)
        for vm in made:
            vm.destroy()
    alone_median = statistics.median(alone_s)
    return {
        "vms": vms,
        "per_vm": per_vm,
        "rounds": rounds,
        "alone_s": alone_median,
        "p50_s": percentile(answers, 50),
        "p99_s": percentile(answers, 99),
        "max_s": max(answers),
        "per_round": per_round,
        "phases_p50": {k: percentile([b[k] for b in breakdown], 50) for k in breakdown[0]},
        "phases_max": {k: max(b[k] for b in breakdown) for k in breakdown[0]},
        "host_concurrency": getattr(settings, "host_concurrency", None),
        "wall_s": sum(r["wall_s"] for r in per_round),
        "cpu_s": cpu_spent,
    }


def print_burst(r: dict) -> None:
    n = r["vms"] * r["per_vm"]
    print(
        f"\n| {n} creates at once over {r['vms']} running KVM VMs ({r['per_vm']} each),"
        f" {r['rounds']} rounds | answer | / one alone |\n|---|---|---|"
    )
    print(f"| one create alone (median of 5) | {r['alone_s'] * 1000:.0f} ms | 1.00 |")
    for key in ("p50", "p99", "max"):
        v = r[f"{key}_s"]
        print(f"| burst {key} | {v * 1000:.0f} ms | {v / r['alone_s']:.2f} |")
    for i, rnd in enumerate(r["per_round"], 1):
        print(
            f"round {i}: all {n} answered in {rnd['wall_s']:.2f} s, p50"
            f" {rnd['p50_s'] * 1000:.0f} ms, max {rnd['max_s'] * 1000:.0f} ms"
        )
    parts = ", ".join(
        f"{k} {r['phases_p50'][k] * 1000:.0f}/{r['phases_max'][k] * 1000:.0f} ms"
        for k in r["phases_p50"]
    )
    print(f"where the time goes (p50/max, from the histories): {parts}")
    n_all = n * r["rounds"]
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in r["cpu_s"].items() if k != "machine")
    print(
        f"CPU spent during the bursts ({r['wall_s']:.2f} s of wall clock, {os.cpu_count()}"
        f" cores): {parts}; the machine {r['cpu_s']['machine']:.2f} s"
        f" ({r['cpu_s']['machine'] / r['wall_s']:.1f} cores busy);"
        f" {sum(v for k, v in r['cpu_s'].items() if k != 'machine') / n_all * 1000:.0f} ms of CPU"
        " per create"
    )
    print(
        f"host worker bound: {r['host_concurrency']} at once; burst p99 under 1 s:"
        f" {r['p99_s'] < 1.0}"
    )


async def main(args: argparse.Namespace) -> None:
    from bench_stack import bench_stack  # beside this file

    async with bench_stack("snapferry-burst-") as stack:
        result = await bench_burst(
            stack.settings,
            stack.client,
            stack.conn,
            stack.work,
            vms=args.vms,
            per_vm=args.per_vm,
            rounds=args.rounds,
            server_pid=stack.server_pid,
        )
    print_burst(result)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--vms", type=int, default=12)
    p.add_argument("--per-vm", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(p.parse_args()))
    sys.stdout.flush()
    os._exit(0)
