"""Backups into the backup repository against the peers, on the same image in the same run.

An 8 GiB KVM volume (qcow2) holding 3 GiB of random data is backed up through the real
stack (Temporal dev server, libvirtd, a host worker, the backup worker its own process) into
an encrypted repository (zstd level 3, AES-256-GCM, every pack read back from the medium
before the backup is published): create -> BackedUp by the workflow's own clock. Against it:

* ``qemu-img convert -f qcow2 -O qcow2`` of the same image, then ``sync`` (CloudStack's own
  copy to secondary: no dedup, no compression, no encryption, no verify);
* ``restic backup`` (Debian's restic, an encrypted repository, password from a file) of the
  same disk as a raw image.

Then 1 % of the volume is rewritten with random 64 KiB writes, and the next backup of each
is timed: snapferry's incremental reads what changed (qemu-img map of the kept layer), restic
reads the whole image again and deduplicates what it finds. Both of snapferry's backups are
restored and compared with the disk's bytes.

Usage: python bench/repository_bench.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapferry.activities.contracts import SnapshotRecord, SnapshotState  # noqa: E402
from snapferry.activities.settings import Settings  # noqa: E402
from snapferry.activities.storage.backup_image import backup_image  # noqa: E402
from snapferry.activities.storage.repository import create_key_file  # noqa: E402
from snapferry.workers import starter  # noqa: E402
from snapferry.workers.demo_vm import MIB, create_vm  # noqa: E402
from snapferry.workers.stack import terminate  # noqa: E402
from snapferry.workers.worker import running_workers  # noqa: E402

GIB = 1024 * MIB
CLUSTER = 64 * 1024


def timed(cmd: list[str], **kwargs: Any) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, **kwargs)
    return time.perf_counter() - t0


def identical(expected: Path, record: SnapshotRecord) -> bool:
    assert record.backup is not None
    with backup_image(record.backup.manifest_path) as raw:
        proc = subprocess.run(
            ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(expected), str(raw)]
        )
    return proc.returncode == 0


def active_layer(conn: Any, name: str) -> str:
    import xml.etree.ElementTree as ET

    import libvirt

    xml = conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    src = ET.fromstring(xml).find("./devices/disk/source")
    assert src is not None
    return src.get("file", "")


def rewrite_one_percent(conn: Any, vm: Any, reference: Path, work: Path, size: int) -> int:
    """Random 64 KiB writes over 1 % of the (stopped) VM's disk, applied to the raw
    reference too; returns the bytes written."""
    rng = random.Random(21)
    clusters = sorted(rng.sample(range(size // CLUSTER), size // CLUSTER // 100))
    source = work / "random-64k"
    commands: list[str] = []
    with open(reference, "r+b") as ref:
        for i, n in enumerate(clusters):
            data = os.urandom(CLUSTER)
            ref.seek(n * CLUSTER)
            ref.write(data)
            part = source.with_name(f"random-64k-{i}")
            part.write_bytes(data)
            commands += ["-c", f"write -q -s {part} {n * CLUSTER} {CLUSTER}"]
    layer = active_layer(conn, vm.name)
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, layer], check=True, capture_output=True)
    for i in range(len(clusters)):
        source.with_name(f"random-64k-{i}").unlink()
    return len(clusters) * CLUSTER


async def bench_repository(
    settings: Settings,
    client: Any,
    conn: Any,
    work: Path,
    *,
    start_backup_worker: Any,
    snapshot_request: Any,
    size: int = 8 * GIB,
    data: int = 3 * GIB,
) -> dict:
    key = work / "repository.key"
    create_key_file(key)
    repo_settings = dataclasses.replace(settings, backup_store="repository")
    env = {"SNAPFERRY_BACKUP_STORE": "repository", "SNAPFERRY_REPOSITORY_KEY_FILE": str(key)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the in-process workers and the restores below read it too
    vm = create_vm(
        conn,
        name=f"sf-bench-{uuid.uuid4().hex[:6]}",
        directory=work / "primary",
        size=size,
        data_bytes=data,
        start=False,
    )
    host = f"bench{uuid.uuid4().hex[:6]}"
    worker = start_backup_worker(repo_settings, **env)
    password = work / "restic.password"
    password.write_text(uuid.uuid4().hex)
    restic_env = dict(os.environ, RESTIC_PASSWORD_FILE=str(password))
    restic_repo = work / "restic"
    peer_out = work / "peer.qcow2"
    assert vm.reference is not None
    now = work / "repo-now.raw"
    try:
        shutil.copyfile(vm.reference, now)
        os.sync()

        async def backed_up() -> tuple[SnapshotRecord, float]:
            answer = await starter.create_snapshot(
                client, snapshot_request(repo_settings, vm.name, host)
            )
            record = await starter.wait_settled(client, answer.id, timeout=3600)
            assert record.state == SnapshotState.BACKED_UP and record.backup and record.created
            at = {t.state: t.at for t in record.transitions}
            return record, (at[SnapshotState.BACKED_UP] - record.created).total_seconds()

        async with running_workers(client, repo_settings, hosts=[host]):
            await asyncio.sleep(1.0)  # let the backup worker process connect
            full, full_s = await backed_up()
            at_full = work / "repo-full.raw"
            shutil.copyfile(now, at_full)
            convert_s = timed(
                ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(vm.disk), str(peer_out)]
            )
            convert_s += timed(["sync"])
            peer_out.unlink()
            subprocess.run(
                ["restic", "init", "-q", "-r", str(restic_repo)],
                check=True,
                capture_output=True,
                env=restic_env,
            )
            restic_full_s = timed(
                ["restic", "-q", "-r", str(restic_repo), "backup", str(now)], env=restic_env
            )
            restic_full_s += timed(["sync"])

            changed = rewrite_one_percent(conn, vm, now, work, size)
            os.sync()
            delta, delta_s = await backed_up()
            restic_delta_s = timed(
                ["restic", "-q", "-r", str(restic_repo), "backup", str(now)], env=restic_env
            )
            restic_delta_s += timed(["sync"])
        assert full.backup and delta.backup and delta.backup.parent == full.id, delta.backup
        exact = identical(at_full, full) and identical(now, delta)
        restic_bytes = sum(p.stat().st_size for p in restic_repo.rglob("*") if p.is_file())
        repo_bytes = sum(
            p.stat().st_size for p in repo_settings.repository.rglob("*") if p.is_file()
        )
    finally:
        terminate(worker.pid)
        vm.destroy()
        for p in (now, work / "repo-full.raw", peer_out):
            p.unlink(missing_ok=True)
        shutil.rmtree(restic_repo, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "size_gib": size / GIB,
        "data_gib": data / GIB,
        "changed_mib": changed / MIB,
        "full_s": full_s,
        "full_verify_s": full.backup.verify_seconds,
        "delta_s": delta_s,
        "convert_sync_s": convert_s,
        "restic_full_s": restic_full_s,
        "restic_delta_s": restic_delta_s,
        "full_stored_mib": full.backup.bytes_stored / MIB,
        "delta_stored_mib": delta.backup.bytes_stored / MIB,
        "repo_mib": repo_bytes / MIB,
        "restic_mib": restic_bytes / MIB,
        "restores_exact": exact,
    }


def print_repository(r: dict) -> None:
    print(
        f"\n| {r['size_gib']:.0f} GiB volume, {r['data_gib']:.0f} GiB random data"
        " | full | next after a 1 % change | store |\n|---|---|---|---|\n"
        f"| snapferry, repository (create -> BackedUp, verified, zstd, AES-GCM)"
        f" | {r['full_s']:.1f} s | {r['delta_s']:.1f} s | {r['repo_mib']:.0f} MiB |\n"
        f"| qemu-img convert -f qcow2 -O qcow2 + sync | {r['convert_sync_s']:.1f} s | - | - |\n"
        f"| restic backup + sync | {r['restic_full_s']:.1f} s | {r['restic_delta_s']:.1f} s"
        f" | {r['restic_mib']:.0f} MiB |"
    )
    print(
        f"\nfull: convert+sync / snapferry {r['convert_sync_s'] / r['full_s']:.2f} (at least 1"
        f" asked), restic / snapferry {r['restic_full_s'] / r['full_s']:.2f} (more than 1);"
        f" next backup: restic / snapferry {r['restic_delta_s'] / r['delta_s']:.1f} (at least 5);"
        f" the incremental ({r['changed_mib']:.0f} MiB changed) stored"
        f" {r['delta_stored_mib']:.1f} MiB; the full's verify {r['full_verify_s']:.1f} s;"
        f" both restore byte-identical: {r['restores_exact']}"
    )


async def main() -> None:
    from bench_stack import bench_stack

    from bench import snapshot_request, start_backup_worker  # type: ignore[attr-defined]

    async with bench_stack() as stack:
        result = await bench_repository(
            stack.settings,
            stack.client,
            stack.conn,
            stack.work,
            start_backup_worker=start_backup_worker,
            snapshot_request=snapshot_request,
        )
    print_repository(result)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)
