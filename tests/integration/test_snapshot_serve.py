"""A backup served as a disk over NBD, and files read out of it with libguestfs, without
restoring it: from both stores, on real libvirtd/QEMU and the real Temporal server.

The VM's disk holds a GPT partition with a real ext4 file system of known files (and, in
one test, XFS on an LVM logical volume). The NBD
export reads byte for byte as the disk; ``snapshot files`` lists a directory of it,
``snapshot restore-file`` copies a file and a tree out; bad input is refused clearly, and no
nbdkit, appliance or socket is left behind, after a refusal or a signal too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import libvirt
import pytest
from temporalio.client import Client

from snapferry.activities.contracts import SnapshotRecord, SnapshotState
from snapferry.activities.settings import Settings
from snapferry.activities.storage import guest_files
from snapferry.activities.storage.repository import create_key_file
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workflows.snapshot import DELETE_UPDATE

from ..conftest import snapferry_cli
from .helpers import images_identical
from .test_kvm_incremental import backed_up

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("nbdkit") is None or shutil.which("guestfish") is None,
        reason="needs nbdkit, nbdkit-plugin-python and libguestfs-tools",
    ),
]

SIZE = 64 * MIB
PART_OFFSET = MIB


@pytest.fixture(autouse=True)
def appliance_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """libguestfs's appliance under TCG, as every VM of the tests (nested KVM may fail)."""
    monkeypatch.setenv("LIBGUESTFS_BACKEND", "direct")
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")


def guest_tree(root: Path) -> dict[str, bytes]:
    """The files the guest's file system holds (path inside it: content)."""
    rng = random.Random(22)
    files = {
        "etc/hostname": b"snapferry-guest\n",
        "data/report.bin": rng.randbytes(MIB),
        "data/sub/notes.txt": b"restore me\n" * 100,
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return files


def partitioned_ext4(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A raw disk: a GPT partition table, and in its partition an ext4 file system made
    from a directory of known files (mkfs.ext4 -d, at the partition's offset)."""
    src = tmp_path / "guest-src"
    files = guest_tree(src)
    raw = tmp_path / "guest.raw"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
    run(["sfdisk", "-q", str(raw)], input=f"label: gpt\nstart={PART_OFFSET // 512}, type=L\n")
    run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", f"offset={PART_OFFSET}"]
        + ["-d", str(src), str(raw), "60M"]
    )
    return raw, files


def run(args: list[str], input: str | None = None) -> str:
    proc = subprocess.run(args, input=input, capture_output=True, text=True)
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc.stdout


def vm_on(make_vm, libvirt_conn: libvirt.virConnect, raw: Path):  # type: ignore[no-untyped-def]
    """A running VM whose disk (qcow2) is ``raw``'s content."""
    vm = make_vm(size=SIZE, data_bytes=0, start=False)
    vm.disk.unlink()
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(vm.disk)])
    libvirt_conn.lookupByName(vm.name).create()
    return vm


def nbdkit_sockets(manifest: str) -> list[str]:
    """The unix sockets of the nbdkit processes serving this manifest."""
    found = []
    for pid in nbdkit_serving(manifest):
        with contextlib.suppress(OSError, ValueError, IndexError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            found.append(args[args.index("-U") + 1])
    return found


def nbdkit_serving(manifest: str) -> list[int]:
    """PIDs of nbdkit processes serving this manifest (any left over is a leak)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and cmdline[0].endswith(b"nbdkit")
            and f"manifest={manifest}".encode() in (cmdline)
        ):
            pids.append(int(proc.name))
    return pids


def processes_mentioning(text: str) -> list[int]:
    """PIDs of processes whose command line holds ``text`` (nbdkit, qemu, guestfish)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def interrupted_files(record: SnapshotRecord) -> None:
    """``snapshot files`` stopped by Ctrl-C while libguestfs's appliance boots on the
    export: it exits 130 and leaves no nbdkit, guestfish, appliance or socket directory."""
    assert record.backup is not None
    manifest = record.backup.manifest_path
    guestfs_before = set(processes_mentioning("guestfs"))
    proc = subprocess.Popen(
        [snapferry_exe(), "snapshot", "files", record.id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if nbdkit_serving(manifest) and set(processes_mentioning("guestfs")) - guestfs_before:
                break
            time.sleep(0.05)
        mine = {Path(sock).parent.name for sock in nbdkit_sockets(manifest)}
        assert mine and proc.poll() is None, "the appliance never started"
        time.sleep(1)  # booting (it takes several seconds under TCG)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        assert proc.returncode == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 15
    while set(processes_mentioning("guestfs")) - guestfs_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(processes_mentioning("guestfs")) - guestfs_before == set()
    assert nbdkit_serving(manifest) == []
    assert not (private_dirs() & mine)


def private_dirs() -> set[str]:
    return {p.name for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("snapferry-nbd-*")}


def snapferry_exe() -> str:
    return shutil.which("snapferry", path=str(Path(sys.executable).parent)) or "snapferry"


def serve_and_check(record: SnapshotRecord, raw: Path, tmp_path: Path, sig: int) -> None:
    """``snapshot serve`` on a given socket: the export is the disk, byte for byte, it
    refuses writes, and ``sig`` ends it with nothing left (socket, nbdkit). Blocking: run
    off the event loop, which the in-process workers share."""
    sock = tmp_path / "serve.sock"
    proc = subprocess.Popen(
        [snapferry_exe(), "snapshot", "serve", record.id, "--socket", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"serve did not start: {proc.communicate(timeout=30)[1]}")
        assert "read-only at nbd+unix:///?socket=" in line, line
        nbdkit_pid = int(re.search(r"nbdkit PID (\d+)", line).group(1))  # type: ignore[union-attr]
        uri = f"nbd+unix:///?socket={sock}"
        assert images_identical(raw, uri)
        write = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 4k", uri], capture_output=True, text=True
        )
        assert write.returncode != 0 and "permission denied" in write.stderr.lower()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "export stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not sock.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(nbdkit_pid, 0)


async def listed_and_one_file_restored(
    record: SnapshotRecord, files: dict[str, bytes], out: Path
) -> None:
    """``snapshot files`` lists a directory (sizes, subdirectories) and ``restore-file``
    brings back one file, byte for byte."""
    listing = await snapferry_cli("snapshot", "files", record.id, "/data")
    assert listing.returncode == 0, listing.stderr
    assert re.search(rf"\s{len(files['data/report.bin'])}\s.*report\.bin$", listing.stdout, re.M)
    assert re.search(r"^d.*\ssub$", listing.stdout, re.M), listing.stdout
    one = await snapferry_cli(
        "snapshot", "restore-file", record.id, "/data/report.bin", "--to", str(out / "one")
    )
    assert one.returncode == 0, one.stderr
    assert (out / "one" / "report.bin").read_bytes() == files["data/report.bin"]


async def tree_restored(record: SnapshotRecord, files: dict[str, bytes], out: Path) -> None:
    """``restore-file`` of a directory (a relative path) brings back its whole tree."""
    tree = await snapferry_cli(
        "snapshot", "restore-file", record.id, "data", "--to", str(out / "t")
    )
    assert tree.returncode == 0, tree.stderr
    for rel in ("data/report.bin", "data/sub/notes.txt"):
        assert (out / "t" / rel).read_bytes() == files[rel]


async def test_a_plain_file_backup_is_served_listed_and_its_files_restored(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    libvirt_conn: libvirt.virConnect,
    host_name: str,
    tmp_path: Path,
) -> None:
    before = private_dirs()
    raw, files = partitioned_ext4(tmp_path)
    vm = vm_on(make_vm, libvirt_conn, raw)
    record = await backed_up(client, vm.name, host_name, settings)
    assert record.backup is not None and "/snapshots/" in record.backup.manifest_path
    manifest = record.backup.manifest_path
    store_before = {p: p.stat().st_mtime_ns for p in Path(manifest).parent.iterdir()}

    await asyncio.to_thread(serve_and_check, record, raw, tmp_path, signal.SIGINT)
    out = tmp_path / "restored"
    out.mkdir()
    await listed_and_one_file_restored(record, files, out)

    # Refused, each with its reason, nothing made. (``snapshot files`` checks a path with
    # the same call as ``restore-file``: one appliance boot shows the refusal for both.)
    gone = await snapferry_cli(
        "snapshot", "restore-file", record.id, "/no/such/dir", "--to", str(out / "nope")
    )
    assert gone.returncode == 1 and "/no/such/dir does not exist in the backup" in gone.stderr
    assert not (out / "nope").exists()
    exists = await snapferry_cli(
        "snapshot", "restore-file", record.id, "/etc/hostname", "--to", str(out / "one")
    )
    assert exists.returncode == 1 and "exists" in exists.stderr
    unknown = await snapferry_cli("snapshot", "files", str(uuid.uuid4()))
    assert unknown.returncode == 1 and "no snapshot with ID" in unknown.stderr
    taken = await snapferry_cli(
        "snapshot", "serve", record.id, "--socket", str(out / "one" / "report.bin")
    )
    assert taken.returncode == 1 and "exists" in taken.stderr
    clear = await snapferry_cli("snapshot", "serve", record.id, "--tcp", "127.0.0.1:1")
    assert clear.returncode == 1 and "--tls-certificates" in clear.stderr

    await asyncio.to_thread(interrupted_files, record)

    # SIGTERM is a clean stop too; the store was only read.
    await asyncio.to_thread(serve_and_check, record, raw, tmp_path, signal.SIGTERM)
    assert {p: p.stat().st_mtime_ns for p in Path(manifest).parent.iterdir()} == store_before
    assert nbdkit_serving(manifest) == [] and private_dirs() <= before

    # A snapshot that is no longer BackedUp is refused.
    deleted = await starter.snapshot_operation(client, record.id, DELETE_UPDATE)
    assert deleted.state == SnapshotState.DESTROYED
    refused = await snapferry_cli("snapshot", "files", record.id)
    assert refused.returncode == 1 and "only a BackedUp snapshot" in refused.stderr


@pytest.mark.backup_store("repository")
async def test_a_repository_backup_is_served_and_its_files_restored_chunk_by_chunk(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    libvirt_conn: libvirt.virConnect,
    host_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    create_key_file(tmp_path / "repo.key")
    monkeypatch.setenv("SNAPFERRY_REPOSITORY_KEY_FILE", str(tmp_path / "repo.key"))
    before = private_dirs()
    raw, files = partitioned_ext4(tmp_path)
    vm = vm_on(make_vm, libvirt_conn, raw)
    record = await backed_up(client, vm.name, host_name, settings)
    assert record.backup is not None and "/backups/" in record.backup.manifest_path
    scratch = settings.repository.parent / "restore-scratch"

    await asyncio.to_thread(serve_and_check, record, raw, tmp_path, signal.SIGINT)
    out = tmp_path / "restored"
    out.mkdir()
    await tree_restored(record, files, out)
    assert not scratch.exists() or not any(scratch.iterdir())  # nothing restored first

    monkeypatch.delenv("SNAPFERRY_REPOSITORY_KEY_FILE")  # for the CLI process
    nokey = await snapferry_cli("snapshot", "files", record.id)
    assert nokey.returncode == 1 and "SNAPFERRY_REPOSITORY_KEY_FILE" in nokey.stderr
    assert nbdkit_serving(record.backup.manifest_path) == [] and private_dirs() <= before


def test_an_encrypted_file_system_is_refused_by_name(tmp_path: Path) -> None:
    disk = tmp_path / "luks.raw"
    with open(disk, "wb") as f:
        f.truncate(32 * MIB)
    (tmp_path / "key").write_bytes(b"not the operator's")
    run(
        ["cryptsetup", "luksFormat", "-q", "--batch-mode", "--type", "luks2"]
        + ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", str(disk)]
        + [str(tmp_path / "key")]
    )
    sock = tmp_path / "luks.sock"
    server = subprocess.Popen(["nbdkit", "-r", "-f", "-U", str(sock), "file", str(disk)])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with (
            pytest.raises(guest_files.GuestFilesError, match=r"/dev/sda is an encrypted file"),
            guest_files.opened(sock),
        ):
            pass
    finally:
        server.terminate()
        server.wait(timeout=10)


def lvm_xfs_disk(path: Path, notes: bytes) -> Path:
    """A disk whose one file system is XFS on an LVM logical volume, made inside
    libguestfs's appliance (no loop device or device mapper needed on the host)."""
    run(
        ["guestfish", "-N", f"{path}=disk:512M", "--"]
        + ["part-disk", "/dev/sda", "mbr", ":", "pvcreate", "/dev/sda1", ":"]
        + ["vgcreate", "vg0", "/dev/sda1", ":", "lvcreate", "lv0", "vg0", "400", ":"]
        + ["mkfs", "xfs", "/dev/vg0/lv0", ":", "mount", "/dev/vg0/lv0", "/", ":"]
        + ["mkdir", "/data", ":", "write", "/data/notes.txt", notes.decode(), ":", "umount-all"]
    )
    return path


async def test_a_file_on_xfs_on_lvm_is_restored(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    libvirt_conn: libvirt.virConnect,
    host_name: str,
    tmp_path: Path,
) -> None:
    notes = b"kept on an LVM volume, in XFS"
    vm = vm_on(make_vm, libvirt_conn, lvm_xfs_disk(tmp_path / "lvm-xfs.raw", notes))
    record = await backed_up(client, vm.name, host_name, settings)
    out = tmp_path / "restored"
    got = await snapferry_cli(
        "snapshot", "restore-file", record.id, "/data/notes.txt", "--to", str(out), timeout=300
    )
    assert got.returncode == 0, got.stderr
    assert (out / "notes.txt").read_bytes() == notes
    assert f"(1 file(s), {len(notes)} bytes)" in got.stdout
