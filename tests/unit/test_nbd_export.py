"""A plain-file backup chain read in place (no materialised image) and served by nbdkit:
the bytes are the chain's, every chunk is checked, nothing is left running."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from snapferry.activities.errors import BackupCorrupt
from snapferry.activities.storage import checksum
from snapferry.activities.storage.nbd_export import ChainDisk, open_disk, overlay, serving
from snapferry.activities.storage.secondary import Manifest

KIB = 1024
MIB = 1024 * KIB
CHUNK = 256 * KIB


def write_backup(
    directory: Path,
    snapshot_id: str,
    image: bytes | bytearray,
    *,
    size: int,
    parent: str | None = None,
    extents: list[tuple[int, int]] | None = None,
) -> Manifest:
    """A backup's files as the secondary store lays them out: a sparse raw file, its chunk
    digests and its manifest. A delta's file holds only its extents (holes elsewhere)."""
    raw = directory / f"{snapshot_id}.raw"
    with open(raw, "wb") as f:
        f.truncate(len(image))
        spans = extents if extents is not None else [(0, len(image))]
        for start, length in spans:
            piece = bytes(image[start : start + length])
            for at in range(0, len(piece), CHUNK):
                block = piece[at : at + CHUNK]
                if any(block):
                    f.seek(start + at)
                    f.write(block)
    data = raw.read_bytes()
    chunks = raw.with_suffix(".chunks")
    chunks.write_text(
        "".join(
            checksum.format_digest_line(checksum.chunk_digest(data[i : i + CHUNK]))
            for i in range(0, len(data), CHUNK)
        )
    )
    manifest = Manifest(
        snapshot_id=snapshot_id,
        vm="vm",
        disk="vda",
        hypervisor="kvm",
        virtual_size=size,
        chunk_size=CHUNK,
        chunks=-(-len(data) // CHUNK),
        checksum="sha256-runs:262144:" + "0" * 64,
        path=str(raw),
        chunks_file=str(chunks),
        source="test",
        source_format="raw",
        parent=parent,
        depth=0 if parent is None else 1,
        extents=extents,
        created=datetime.now(UTC),
    )
    (directory / f"{snapshot_id}.manifest.json").write_text(manifest.model_dump_json())
    return manifest


def chain_of_three(tmp_path: Path, size: int = 8 * MIB) -> tuple[Manifest, bytearray]:
    """A full backup with data and holes, then two deltas, the second over the first's
    extents in part; returns the newest and the disk it stands for."""
    rng = random.Random(5)
    disk = bytearray(size)
    for start in (0, 3 * MIB + 100, 6 * MIB):
        disk[start : start + MIB] = rng.randbytes(MIB)
    write_backup(tmp_path, "full", disk, size=size)
    first = [(MIB, 512 * KIB), (4 * MIB, 2 * MIB)]
    for start, length in first:
        disk[start : start + length] = rng.randbytes(length)
    disk[4 * MIB : 4 * MIB + 64 * KIB] = bytes(64 * KIB)  # zeros inside an extent
    write_backup(tmp_path, "d1", disk, size=size, parent="full", extents=first)
    second = [(5 * MIB, MIB), (size - 64 * KIB, 64 * KIB)]
    for start, length in second:
        disk[start : start + length] = rng.randbytes(length)
    newest = write_backup(tmp_path, "d2", disk, size=size, parent="d1", extents=second)
    return newest, disk


def test_overlay_gives_each_byte_to_the_newest_layer_holding_it() -> None:
    assert overlay(100, []) == [(0, 100, -1)]
    assert overlay(100, [[(10, 20), (50, 80)], [(20, 40)]]) == [
        (0, 10, -1),
        (10, 20, 0),
        (20, 60, 1),
        (60, 100, 0),
    ]


def test_a_chain_reads_as_the_disk_at_any_offset_without_a_scratch_image(
    tmp_path: Path,
) -> None:
    newest, disk = chain_of_three(tmp_path)
    reader = open_disk(tmp_path / "d2.manifest.json")
    assert isinstance(reader, ChainDisk) and reader.size == len(disk)
    assert reader.read(0, len(disk)) == bytes(disk)
    rng = random.Random(1)
    for _ in range(200):
        offset = rng.randrange(len(disk))
        length = rng.randrange(1, 300 * KIB)
        assert reader.read(offset, length) == bytes(disk[offset : offset + length]).ljust(
            length, b"\0"
        )
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_extents_name_only_zeros_as_zero_and_cover_the_disk(tmp_path: Path) -> None:
    _, disk = chain_of_three(tmp_path)
    reader = open_disk(tmp_path / "d2.manifest.json")
    for offset, length in ((0, len(disk)), (3 * MIB + 7, 2 * MIB), (len(disk) - 100, 100)):
        runs = reader.extents(offset, length)
        assert runs[0][0] == offset and sum(n for _, n, _ in runs) == length
        assert all(a + n == b for (a, n, _), (b, _, _) in zip(runs, runs[1:], strict=False))
        for start, n, zero in runs:
            if zero:
                assert not any(disk[start : start + n]), (start, n)
    # The full backup's holes that no delta covers are reported as zeros.
    assert any(zero for _, _, zero in reader.extents(0, len(disk)))


def test_a_damaged_chunk_is_refused_not_served(tmp_path: Path) -> None:
    chain_of_three(tmp_path)
    with open(tmp_path / "d1.raw", "r+b") as f:
        f.seek(4 * MIB + 100 * KIB)
        f.write(b"\xff")
    reader = open_disk(tmp_path / "d2.manifest.json")
    assert reader.read(0, MIB)  # other chunks still read
    with pytest.raises(BackupCorrupt, match="does not match its digest"):
        reader.read(4 * MIB + 90 * KIB, 64 * KIB)


def test_a_missing_parent_is_refused_before_serving(tmp_path: Path) -> None:
    chain_of_three(tmp_path)
    (tmp_path / "d1.manifest.json").unlink()
    with pytest.raises(BackupCorrupt, match="needs d1"), serving(tmp_path / "d2.manifest.json"):
        pass


@pytest.mark.skipif(shutil.which("nbdkit") is None, reason="needs nbdkit")
def test_nbdkit_serves_the_chain_read_only_and_leaves_nothing_behind(tmp_path: Path) -> None:
    _, disk = chain_of_three(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    out = tmp_path / "out" / "copy.raw"
    out.parent.mkdir()
    with serving(tmp_path / "d2.manifest.json") as export:
        assert export.socket is not None
        assert oct(export.socket.parent.stat().st_mode & 0o777) == "0o700"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", export.uri, str(out)], check=True
        )
        # Read-only: a write is refused by the server.
        write = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 4k", export.uri],
            capture_output=True,
            text=True,
        )
        assert write.returncode != 0 and "permission denied" in write.stderr.lower(), write
        pid = export.process.pid
        sock = export.socket
    assert out.read_bytes() == bytes(disk)
    assert not sock.exists() and not sock.parent.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != "out"}
    assert after == before


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def certificates(d: Path) -> tuple[Path, Path]:
    """nbdkit's server directory and qemu's client directory, both from one CA."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca",
            "-keyout", "ca.key", "-out", "ca-cert.pem", cwd=d)  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\n"), ("client", "")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(ext or "basicConstraints=CA:FALSE\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                "-out", f"{name}-cert.pem", cwd=d)  # fmt: skip
    server, client = d / "server", d / "client"
    for directory, name in ((server, "server"), (client, "client")):
        directory.mkdir()
        for suffix in ("cert.pem", "key.pem"):
            shutil.copy(d / f"{name}-{suffix}", directory / f"{name}-{suffix}")
        shutil.copy(d / "ca-cert.pem", directory / "ca-cert.pem")
    return server, client


@pytest.mark.skipif(shutil.which("nbdkit") is None, reason="needs nbdkit")
def test_on_tcp_only_tls_clients_with_a_certificate_read_it(tmp_path: Path) -> None:
    from snapferry.workers.stack import free_port

    _, disk = chain_of_three(tmp_path)
    pki = tmp_path / "pki"
    pki.mkdir()
    server, client = certificates(pki)
    port = free_port()
    out = tmp_path / "copy.raw"
    with serving(tmp_path / "d2.manifest.json", tcp=("127.0.0.1", port), tls_dir=server) as e:
        assert e.uri == f"nbds://127.0.0.1:{port}" and e.socket is None
        tls = f"tls-creds-x509,id=tls0,endpoint=client,dir={client}"
        opts = f"driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port}"
        subprocess.run(
            ["qemu-img", "convert", "--object", tls, "--image-opts", f"{opts},file.tls-creds=tls0"]
            + ["-O", "raw", str(out)],
            check=True,
            capture_output=True,
        )
        plain = subprocess.run(
            ["qemu-img", "info", "--image-opts", opts], capture_output=True, text=True
        )
        assert plain.returncode != 0 and "TLS negotiation required" in plain.stderr
        (client / "client-cert.pem").unlink()
        (client / "client-key.pem").unlink()
        anonymous = subprocess.run(
            ["qemu-img", "info", "--object", tls, "--image-opts", f"{opts},file.tls-creds=tls0"],
            capture_output=True,
            text=True,
        )
        # A TLS client without a certificate is turned away during the handshake.
        assert anonymous.returncode != 0 and "TLS channel" in anonymous.stderr
    assert out.read_bytes() == bytes(disk)


def test_a_detached_export_leaves_a_systemd_service_s_cgroup_only_under_systemd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from snapferry.activities.storage import nbd_export

    real_is_dir = Path.is_dir
    booted = {"yes": True}

    def is_dir(self: Path) -> bool:
        if str(self) == "/run/systemd/system":
            return booted["yes"]
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    monkeypatch.setattr(nbd_export.shutil, "which", lambda name: f"/usr/bin/{name}")
    prefix = nbd_export.outside_the_service("snapferry-export-ab12")
    assert prefix[:2] == ["systemd-run", "--scope"] and "--unit=snapferry-export-ab12" in prefix
    booted["yes"] = False
    assert nbd_export.outside_the_service("snapferry-export-ab12") == []
