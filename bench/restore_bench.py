"""Reading a backup without restoring it: the NBD export and file restore, from both stores.

An 8 GiB disk (a GPT partition holding ext4, made by ``mkfs.ext4 -d`` from a directory with
1 GiB of random files and one 1 MiB file) is backed up with snapferry's own writers into
each store on secondary: a plain-file full backup (the copy engine: sparse raw file and chunk
digests) and an encrypted repository backup (64 KiB chunks, zstd, AES-256-GCM). For each:

* the time for ``snapshot serve`` to listen, and the NBD export's read throughput (the whole
  disk read by ``qemu-img convert`` from ``nbd+unix://``, checked byte for byte against the
  disk) against ``snapshot export --format raw`` of the same backup (which writes and
  compares a whole image);
* the time to list a directory (``snapshot files``: serve, boot libguestfs's appliance,
  mount, ``ll``) and to restore the 1 MiB file (``restore-file``: the same, then
  ``copy-out``), with no full restore: what they read is counted from the plugin's reads.

The appliance boots under TCG here (``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``: nested KVM
fails on this machine), which dominates the file timings.

Usage: python bench/restore_bench.py [--size-gib 8] [--data-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapferry.activities.storage import guest_files  # noqa: E402
from snapferry.activities.storage.checksum import data_segments  # noqa: E402
from snapferry.activities.storage.copy_engine import CopyEngine, CopyTarget  # noqa: E402
from snapferry.activities.storage.nbd_export import serving  # noqa: E402
from snapferry.activities.storage.reader import QemuImageReader  # noqa: E402
from snapferry.activities.storage.repository import Repository, create_key_file  # noqa: E402
from snapferry.activities.storage.secondary import Manifest  # noqa: E402
from snapferry.workers.cli.export import export_backup  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
PART = MIB
SEG = 4 * MIB


def run(args: list[str], **kwargs: object) -> None:
    subprocess.run(args, check=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def make_disk(work: Path, size: int, data: int) -> tuple[Path, bytes]:
    src = work / "src"
    rng = random.Random(22)
    (src / "bulk").mkdir(parents=True)
    for i in range(data // (64 * MIB)):
        (src / "bulk" / f"f{i:03d}.bin").write_bytes(rng.randbytes(64 * MIB))
    one = rng.randbytes(MIB)
    (src / "data").mkdir()
    (src / "data" / "one.bin").write_bytes(one)
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    run(["sfdisk", "-q", str(raw)], input=b"label: gpt\nstart=2048, type=L\n")
    fs_mib = (size - 2 * PART) // MIB
    run(["mkfs.ext4", "-q", "-F", "-E", f"offset={PART}", "-d", str(src), str(raw), f"{fs_mib}M"])
    shutil.rmtree(src)
    return raw, one


def plain_backup(raw: Path, root: Path) -> Path:
    d = root / "snapshots" / "vm" / "vda"
    d.mkdir(parents=True)
    target = CopyTarget(data=d / "full.raw.partial", digests=d / "full.chunks.partial")
    reader = QemuImageReader(str(raw), "raw")
    outcome = CopyEngine(chunk_size=4 * MIB).copy(reader, target)
    reader.close()
    os.replace(target.data, d / "full.raw")
    os.replace(target.digests, d / "full.chunks")
    manifest = Manifest(
        snapshot_id="full",
        vm="vm",
        disk="vda",
        hypervisor="kvm",
        virtual_size=outcome.virtual_size,
        chunk_size=4 * MIB,
        chunks=outcome.chunks,
        checksum=outcome.checksum,
        path=str(d / "full.raw"),
        chunks_file=str(d / "full.chunks"),
        source=str(raw),
        source_format="raw",
        created=datetime.now(UTC),
    )
    path = d / "full.manifest.json"
    path.write_text(manifest.model_dump_json())
    return path


def repository_backup(raw: Path, root: Path, key_file: Path) -> Path:
    repo = Repository(root / "repository", create_key_file(key_file))
    size = raw.stat().st_size
    w = repo.writer(snapshot_id="full", vm="vm", disk="vda", virtual_size=size)
    fd = os.open(raw, os.O_RDONLY)
    try:
        windows = sorted(
            {w for a, b in data_segments(fd) for w in range(a // SEG, (b - 1) // SEG + 1)}
        )
        for seg in windows:
            w.write(seg * SEG, os.pread(fd, min(SEG, size - seg * SEG), seg * SEG))
    finally:
        os.close(fd)
    w.commit()
    return repo.manifest_path("vm", "vda", "full")


def timed(fn) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def bench_store(name: str, manifest: Path, raw: Path, one: bytes, work: Path) -> dict:
    size = raw.stat().st_size
    r: dict[str, object] = {"store": name}
    t0 = time.monotonic()
    with serving(manifest) as export:
        r["serve_ready_s"] = round(time.monotonic() - t0, 3)
        out = work / f"{name}-nbd.raw"
        r["nbd_read_s"], _ = timed(
            lambda: run(
                ["qemu-img", "convert", "-f", "raw", "-O", "raw", "-S", "4k", export.uri, str(out)]
            )
        )
        run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(raw), str(out)])
        out.unlink()
    exported = work / f"{name}-export.raw"
    r["export_s"], _ = timed(lambda: export_backup(str(manifest), "raw", exported))
    exported.unlink()

    def listing() -> str:
        with serving(manifest) as e:
            assert e.socket is not None
            with guest_files.opened(e.socket) as (g, _):
                return g.call("ll", "/data")

    r["files_s"], text = timed(listing)
    assert "one.bin" in str(text)
    dest = work / f"{name}-restored"

    def restore() -> None:
        with serving(manifest) as e:
            assert e.socket is not None
            with guest_files.opened(e.socket) as (g, _):
                dest.mkdir()
                g.call("copy-out", "/data/one.bin", str(dest))

    r["restore_1mib_s"], _ = timed(restore)
    assert (dest / "one.bin").read_bytes() == one
    shutil.rmtree(dest)
    for k in ("nbd_read_s", "export_s", "files_s", "restore_1mib_s"):
        r[k] = round(float(r[k]), 3)  # type: ignore[arg-type]
    r["nbd_read_mib_s"] = round(size / MIB / float(r["nbd_read_s"]), 1)  # type: ignore[arg-type]
    r["export_mib_s"] = round(size / MIB / float(r["export_s"]), 1)  # type: ignore[arg-type]
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=int, default=8)
    ap.add_argument("--data-mib", type=int, default=1024)
    args = ap.parse_args()
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    work = Path(tempfile.mkdtemp(prefix="sf-restore-bench-"))
    try:
        t, (raw, one) = timed(lambda: make_disk(work, args.size_gib * GIB, args.data_mib * MIB))
        print(f"disk: {args.size_gib} GiB, {args.data_mib} MiB of files, made in {t:.1f} s")
        secondary = work / "secondary"
        key = work / "repo.key"
        os.environ["SNAPFERRY_REPOSITORY_KEY_FILE"] = str(key)
        t, plain = timed(lambda: plain_backup(raw, secondary))
        print(f"plain-file backup written in {t:.1f} s")
        t, repo = timed(lambda: repository_backup(raw, secondary, key))
        print(f"repository backup written in {t:.1f} s")
        results = [
            bench_store("files", plain, raw, one, work),
            bench_store("repository", repo, raw, one, work),
        ]
        cols = list(results[0])
        print(" | ".join(cols))
        for row in results:
            print(" | ".join(str(row[c]) for c in cols))
        print(json.dumps(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
