"""A delta of a large thin qcow2 volume: peak RSS of the backup process and the seconds
from a resume to its first progress after a kill at a late checkpoint.

A thin qcow2 volume of ``--virtual-gib`` (1 TiB by default) holds 4 MiB in its base layer;
the layer above it (the base snapshot's overlay: the delta is what changed there and above,
as the KVM driver plans it) holds 64 writes of 64 KiB. The delta is copied in the backup's
64 KiB delta chunks by the real copy engine, reader and store (list the extents, copy,
verify from the medium, rename, manifest), each run in its own process so that its peak
RSS is its own:

- ``delta``: the writes all in the volume's first 5 %, so that the unchanged tail is 95 %
  of it, in one run of holes; uninterrupted;
- ``killed``: the writes spread over the whole volume (the last past 90 % of it), killed
  (SIGKILL) right after the first checkpoint past 90 % (checkpoints are taken at every
  step here, rather than every second, so that there is one);
- ``resume``: a new process resuming from that checkpoint (as a retry does from its
  heartbeat details): seconds from its start, and from the engine's ``copy`` call, to the
  first progress report, then to the end.

Its peer in the same run is the same delta on a small volume (``--peer-gib``, 16 GiB), so
the ratios show what the virtual size costs. ``--old-rev`` also runs the copy of a given
revision (``git archive``) on a smaller volume (``--old-gib``), for comparison.

Usage: python bench/large_delta_bench.py [--virtual-gib 1024] [--old-rev REV --old-gib 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3
MIB = 1024**2
WRITE = 64 * 1024
HERE = Path(__file__).resolve().parent


def qemu(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True)


def make_volume(
    directory: Path, virtual: int, *, spread: bool, writes: int = 64
) -> tuple[Path, Path]:
    """base.qcow2 (``virtual`` bytes, 4 MiB of data) and top.qcow2 above it, holding
    ``writes`` 64 KiB writes: ``spread`` evenly over the volume (the last past 90 % of
    it), or else all in its first 5 %, so that its unchanged tail is 95 % of it."""
    directory.mkdir(parents=True, exist_ok=True)
    base, top = directory / "base.qcow2", directory / "top.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(virtual))
    base_cmds = [f"write -P 0x11 {k * (virtual // 4)} 1M" for k in range(4)]
    qemu("qemu-io", "-f", "qcow2", *sum((["-c", c] for c in base_cmds), []), str(base))
    qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    step = (virtual if spread else virtual // 20) // writes // WRITE * WRITE
    top_cmds = [f"write -P {0x20 + k % 200} {k * step + 5 * WRITE} 64K" for k in range(writes)]
    qemu("qemu-io", "-f", "qcow2", *sum((["-c", c] for c in top_cmds), []), str(top))
    return base, top


def peak_rss_mib() -> dict[str, float]:
    """This process's peak RSS, two ways: ru_maxrss and /proc VmHWM."""
    hwm = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return {
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "vmhwm_mib": hwm,
    }


def child(args: argparse.Namespace) -> None:
    """One backup process: copy the delta (resuming from ``--resume`` if given), verify,
    publish. Prints one JSON line; ``--kill-past`` kills itself after the first checkpoint
    past that offset (its checkpoint written first, as a heartbeat would carry it)."""
    t_start = time.monotonic()
    sys.path.insert(0, str(args.tree))
    from snapferry.activities.backup import DELTA_CHUNK_SIZE
    from snapferry.activities.contracts import BackupPlan, VmRef, VolumeRef
    from snapferry.activities.storage.copy_engine import Checkpoint, CopyEngine
    from snapferry.activities.storage.reader import QemuImageReader
    from snapferry.activities.storage.secondary import SecondaryStore

    volume = VolumeRef(vm=VmRef(name="bench", host="h1", hypervisor="kvm"), disk="vda")
    store = SecondaryStore(args.secondary)
    snapshot_id = "00000000-0000-4000-8000-000000000001"
    target = store.target(volume, snapshot_id)
    resume = Checkpoint.model_validate_json(args.resume.read_text()) if args.resume else None
    first_report: list[float] = []
    t_copy = [0.0]

    def on_checkpoint(cp: Checkpoint, done: int) -> None:
        if not first_report:
            first_report.append(time.monotonic())
        if args.checkpoints is not None:
            tmp = args.checkpoints.with_suffix(".tmp")
            tmp.write_text(cp.model_dump_json())
            os.replace(tmp, args.checkpoints)
        if args.kill_past is not None and done > args.kill_past:
            os.kill(os.getpid(), signal.SIGKILL)

    # The KVM driver's delta: what changed in the base snapshot's overlay and above it
    # (``changed_above`` names that overlay, itself included); here top.qcow2.
    reader = QemuImageReader(str(args.top), "qcow2", changed_above=str(args.top))
    listed = list(reader.data_extents())
    # A checkpoint after every step (the product's bound is 1 s, which this whole delta may
    # not take): so that there is one past 90 % to be killed at.
    engine = CopyEngine(chunk_size=DELTA_CHUNK_SIZE, checkpoint_seconds=0.0)
    t_copy[0] = time.monotonic()
    try:
        outcome = engine.copy(
            reader, target, resume=resume, on_checkpoint=on_checkpoint, extents=listed
        )
    finally:
        reader.close()
    t_copied = time.monotonic()
    store.finalize(
        volume=volume,
        snapshot_id=snapshot_id,
        target=target,
        outcome=outcome,
        source=str(args.top),
        source_format="qcow2",
        plan=BackupPlan(parent="00000000-0000-4000-8000-000000000000", base_image=str(args.top)),
        extents=[(e.start, e.length) for e in listed],
    )
    t_end = time.monotonic()
    chunks = store.image_path(volume, snapshot_id).with_suffix(".chunks")
    print(
        json.dumps(
            {
                **peak_rss_mib(),
                "checksum": outcome.checksum,
                "resumed_from": outcome.resumed_from,
                "bytes_copied": outcome.bytes_copied,
                "start_to_first_progress_s": first_report[0] - t_start,
                "copy_call_to_first_progress_s": first_report[0] - t_copy[0],
                "copy_s": t_copied - t_copy[0],
                "verify_publish_s": t_end - t_copied,
                "total_s": t_end - t_start,
                "chunks_file_bytes": chunks.stat().st_size,
            }
        ),
        flush=True,
    )


def run_child(tree: Path, work: Path, base: Path, top: Path, secondary: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(HERE / "large_delta_bench.py"), "--child", "--tree", str(tree)]
    cmd += ["--base", str(base), "--top", str(top), "--secondary", str(secondary), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == -signal.SIGKILL:
        return {"killed": True}
    if proc.returncode != 0:
        raise RuntimeError(f"backup process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_volume(tree: Path, work: Path, virtual: int, *, with_resume: bool) -> dict:
    """The delta of one volume whose unchanged tail is 95 % of it, uninterrupted; and
    (``with_resume``) that of one with changes spread all over it, killed late, resumed."""
    vol = work / f"vol-{virtual // GIB}g-{tree.name}"
    base, top = make_volume(vol / "tail", virtual, spread=False)
    out: dict = {"virtual_gib": virtual // GIB}
    out["delta"] = run_child(tree, work, base, top, vol / "secondary-a")
    if with_resume:
        base, top = make_volume(vol / "spread", virtual, spread=True)
        whole = run_child(tree, work, base, top, vol / "secondary-c")
        cp = vol / "checkpoint.json"
        killed = run_child(
            tree,
            work,
            base,
            top,
            vol / "secondary-b",
            "--checkpoints",
            str(cp),
            "--kill-past",
            str(int(virtual * 0.9)),
        )
        assert killed.get("killed"), "the backup process was to be killed at a late checkpoint"
        late = json.loads(cp.read_text())
        out["killed_at_gib"] = late["chunks_done"] * late["chunk_size"] / GIB
        out["resume"] = run_child(tree, work, base, top, vol / "secondary-b", "--resume", str(cp))
        assert out["resume"]["checksum"] == whole["checksum"], "the resume changed the bytes"
    shutil.rmtree(vol, ignore_errors=True)
    return out


def old_tree(rev: str, work: Path) -> Path:
    """The product at ``rev`` (``git archive``), importable as ``snapferry``."""
    tree = work / f"old-{rev}"
    (tree / "snapferry").mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree / "snapferry")], input=archive, check=True)
    return tree / "snapferry"


def bench_large_delta(
    work: Path,
    virtual_gib: int = 1024,
    peer_gib: int = 16,
    old_rev: str | None = None,
    old_gib: int = 64,
) -> dict:
    """What ``make bench`` runs: the large volume (killed and resumed), its small peer and,
    with ``old_rev``, that revision's copy of a volume of ``old_gib``."""
    work.mkdir(parents=True, exist_ok=True)
    tree = HERE.parent  # the checkout itself: bench.py runs from it
    result = {
        "large": bench_volume(tree, work, virtual_gib * GIB, with_resume=True),
        "peer": bench_volume(tree, work, peer_gib * GIB, with_resume=True),
    }
    if old_rev:
        old = old_tree(old_rev, work)
        result["old_rev"] = old_rev
        result["old"] = bench_volume(old, work, old_gib * GIB, with_resume=True)
        result["new_at_old_size"] = bench_volume(tree, work, old_gib * GIB, with_resume=True)
    return result


def print_large_delta(r: dict) -> None:
    large, peer = r["large"], r["peer"]

    def row(name: str, v: dict) -> str:
        d, s = v["delta"], v["resume"]
        return (
            f"| {name} | {v['virtual_gib']} GiB | {d['bytes_copied'] / MIB:.1f} MiB"
            f" | {d['vmhwm_mib']:.0f} MiB | {s['vmhwm_mib']:.0f} MiB | {d['total_s']:.2f} s"
            f" | {v['killed_at_gib']:.0f} GiB | {s['start_to_first_progress_s']:.2f} s"
            f" | {s['copy_call_to_first_progress_s']:.3f} s | {s['total_s']:.2f} s"
            f" | {d['chunks_file_bytes']} B |"
        )

    print(
        "\n| large thin delta (64 KiB chunks) | virtual | changed | delta, 95 % tail: peak RSS"
        " (VmHWM) | resume: peak RSS | delta total | spread delta killed at"
        " | resume: start -> first progress | copy() -> first progress | resume total"
        " | .chunks (tail delta) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(row("this version", large))
    print(row("peer: small volume", peer))
    if "old" in r:
        print(row(f"{r['old_rev']} (before)", r["old"]))
        print(row("this version, same size", r["new_at_old_size"]))
    ratio = large["virtual_gib"] / peer["virtual_gib"]
    rss = large["delta"]["vmhwm_mib"] / peer["delta"]["vmhwm_mib"]
    took = large["delta"]["total_s"] / peer["delta"]["total_s"]
    first = (
        large["resume"]["start_to_first_progress_s"] / peer["resume"]["start_to_first_progress_s"]
    )
    print(
        f"\n{ratio:.0f}x the virtual size: peak RSS x{rss:.2f}, delta time x{took:.2f}, resume"
        f" to first progress x{first:.2f} (the issue asks for <= 200 MiB RSS at 2 TiB)"
    )
    if "old" in r:
        old, new = r["old"], r["new_at_old_size"]
        print(
            f"at {old['virtual_gib']} GiB, {r['old_rev']} against this version: peak RSS"
            f" {old['delta']['vmhwm_mib']:.0f} / {new['delta']['vmhwm_mib']:.0f} MiB, delta"
            f" {old['delta']['total_s']:.1f} / {new['delta']['total_s']:.2f} s, resume to first"
            f" progress {old['resume']['start_to_first_progress_s']:.2f}"
            f" / {new['resume']['start_to_first_progress_s']:.2f} s"
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", type=Path, default=HERE.parent)
    p.add_argument("--base", type=Path)
    p.add_argument("--top", type=Path)
    p.add_argument("--secondary", type=Path)
    p.add_argument("--resume", type=Path)
    p.add_argument("--checkpoints", type=Path)
    p.add_argument("--kill-past", type=int)
    p.add_argument("--virtual-gib", type=int, default=1024)
    p.add_argument("--peer-gib", type=int, default=16)
    p.add_argument("--old-rev")
    p.add_argument("--old-gib", type=int, default=64)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    work = Path(
        tempfile.mkdtemp(prefix="snapferry-large-delta-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    )
    try:
        result = bench_large_delta(
            work, args.virtual_gib, args.peer_gib, args.old_rev, args.old_gib
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_large_delta(result)


if __name__ == "__main__":
    main()
