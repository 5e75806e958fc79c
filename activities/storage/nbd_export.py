"""A backup as a read-only disk over NBD: nbdkit's Python plugin reading the store on demand.

Nothing is restored first. A repository backup is read chunk by chunk with
:class:`~.repository.backups.BackupReader` (every chunk checked against its ID, the key from
``SNAPFERRY_REPOSITORY_KEY_FILE``); a plain-file backup is read through its chain, each delta's
``extents`` over its parent's image, without materialising it: every chunk served is checked
against the owning file's ``.chunks`` digest first, and a hole costs no read. The store is
opened read-only and never written.

:func:`serving` runs ``nbdkit -r`` with :mod:`.nbd_plugin` on a unix socket in a private
directory (mode 0700), or on TCP with TLS and client certificates required, and stops it
(by its PID) and removes what it made when the context ends; ``--exit-with-parent`` ends it
with its parent, too.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import BackupCorrupt, InvalidInput
from . import checksum
from .backup_image import repository_of
from .checksum import data_segments
from .repository.backups import BackupReader
from .repository.blobs import ZERO_ID
from .secondary import Manifest, SecondaryStore

PLUGIN = Path(__file__).with_name("nbd_plugin.py")
START_TIMEOUT_S = 30.0


class Disk(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(start, length, zero)`` runs from ``offset``: where the disk reads as zeros
        without a read (a client skips them); at least the first, up to ``length``."""
        ...


class RepositoryDisk:
    """A repository backup, read chunk by chunk (zeros where it holds none)."""

    def __init__(self, reader: BackupReader) -> None:
        self.reader = reader
        self.size = reader.manifest.virtual_size

    def read(self, offset: int, length: int) -> bytes:
        data = self.reader.read(offset, length)
        return data + bytes(length - len(data)) if len(data) < length else data

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        r, m = self.reader, self.reader.manifest
        end = min(offset + length, self.size)
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end:
            seg = pos // r.seg_bytes
            if r.segment_id(seg) == ZERO_ID:
                step, zero = (seg + 1) * r.seg_bytes - pos, True
            else:
                c = pos // r.chunk
                zero = r.chunk_ids(seg)[c % m.segment_chunks] == ZERO_ID
                step = (c + 1) * r.chunk - pos
            step = min(step, end - pos)
            if runs and runs[-1][2] == zero:
                runs[-1] = (runs[-1][0], runs[-1][1] + step, zero)
            else:
                runs.append((pos, step, zero))
            pos += step
        return runs


class _Digests:
    """A ``.chunks`` file: the expected digest of each chunk, runs kept as one entry."""

    def __init__(self, path: Path) -> None:
        self.starts: list[int] = []
        self.digests: list[str] = []
        self.count = 0
        try:
            with open(path) as f:
                for digest, n in checksum.read_digest_lines(f):
                    self.starts.append(self.count)
                    self.digests.append(digest)
                    self.count += n
        except FileNotFoundError:
            raise BackupCorrupt(f"{path}: the backup's chunk digests are missing") from None
        except ValueError as err:
            raise BackupCorrupt(f"{path}: {err}") from None

    def of(self, chunk: int) -> str | None:
        if chunk >= self.count:
            return None
        return self.digests[bisect.bisect_right(self.starts, chunk) - 1]


class _Layer:
    """One file of a chain, read a verified chunk at a time."""

    def __init__(self, manifest: Manifest) -> None:
        self.path = Path(manifest.path)
        self.chunk = manifest.chunk_size
        self.digests = _Digests(Path(manifest.chunks_file))
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise BackupCorrupt(f"{self.path}: the backup's image is missing") from None
        self.file_size = os.fstat(self.fd).st_size
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    def close(self) -> None:
        os.close(self.fd)

    def _is_hole(self, pos: int, n: int) -> bool:
        try:
            return os.lseek(self.fd, pos, os.SEEK_DATA) >= pos + n
        except OSError:  # ENXIO: no data after pos
            return True

    def chunk_at(self, index: int) -> bytes:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        pos = index * self.chunk
        n = max(0, min(self.chunk, self.file_size - pos))
        if n == 0:
            return b""
        if self._is_hole(pos, n):  # zeros without a read; its digest is known
            data, got = bytes(n), checksum.zero_digest(n)
        else:
            data = os.pread(self.fd, n, pos)
            if len(data) != n:
                raise BackupCorrupt(f"{self.path} ends before {pos + n}")
            got = checksum.chunk_digest(data)
        if self.digests.of(index) != got:
            raise BackupCorrupt(
                f"{self.path}: chunk {index} (offset {pos}) does not match its digest"
            )
        self._cache[index] = data
        if len(self._cache) > 4:
            self._cache.popitem(last=False)
        return data

    def extents(self, start: int, stop: int) -> Iterator[tuple[int, int, bool]]:
        """Data and holes of the file in [start, stop) (past its end: zeros)."""
        pos = start
        for a, b in data_segments(self.fd, start, min(stop, self.file_size)):
            if a > pos:
                yield pos, a - pos, True
            yield a, b - a, False
            pos = b
        if pos < stop:
            yield pos, stop - pos, True

    def read_into(self, out: bytearray, at: int, start: int, stop: int) -> None:
        """Bytes [start, stop) of the file into ``out[at:]`` (zeros past its end)."""
        pos = start
        while pos < stop:
            index = pos // self.chunk
            base = index * self.chunk
            take = min(stop, base + self.chunk) - pos
            data = self.chunk_at(index)[pos - base : pos - base + take]
            out[at + pos - start : at + pos - start + len(data)] = data
            pos += take


def overlay(size: int, layers: list[list[tuple[int, int]]]) -> list[tuple[int, int, int]]:
    """Which layer holds each byte of [0, size): ``(start, end, layer)`` runs in order,
    covering it all, where layer ``k`` is ``layers[k]``'s extents (oldest first, a later one
    over an earlier one) and -1 the base beneath them all."""
    events: list[tuple[int, int, int]] = []
    for k, extents in enumerate(layers):
        for start, length in extents:
            end = min(start + length, size)
            if end > start:
                events += [(start, 1, k), (end, -1, k)]
    events.sort()
    bounds = sorted({0, size, *(e[0] for e in events)})
    active = [0] * len(layers)
    heap: list[int] = []
    runs: list[tuple[int, int, int]] = []
    i = 0
    for j, pos in enumerate(bounds[:-1]):
        while i < len(events) and events[i][0] == pos:
            _, step, k = events[i]
            active[k] += step
            if step > 0:
                heapq.heappush(heap, -k)
            i += 1
        while heap and active[-heap[0]] == 0:
            heapq.heappop(heap)
        owner = -heap[0] if heap else -1
        if runs and runs[-1][2] == owner:
            runs[-1] = (runs[-1][0], bounds[j + 1], owner)
        else:
            runs.append((pos, bounds[j + 1], owner))
    return runs


class ChainDisk:
    """A plain-file backup, its chain read in place: each delta's extents over the older."""

    def __init__(self, manifest: Manifest) -> None:
        self.size = manifest.virtual_size
        chain = SecondaryStore.chain(manifest)  # newest first
        self.layers: list[_Layer] = []
        try:
            for link in reversed(chain):
                self.layers.append(_Layer(link))
        except BaseException:
            self.close()
            raise
        # layers[0] is the full backup; the deltas follow, oldest first.
        self.runs = overlay(self.size, [link.extents or [] for link in reversed(chain[:-1])])
        self.starts = [r[0] for r in self.runs]

    def close(self) -> None:
        for layer in self.layers:
            layer.close()
        self.layers = []

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        end = min(offset + length, self.size)
        i = max(0, bisect.bisect_right(self.starts, offset) - 1)
        while offset < end and i < len(self.runs):
            start, stop, owner = self.runs[i]
            a, b = max(start, offset), min(stop, end)
            if a < b:
                self.layers[owner + 1].read_into(out, a - offset, a, b)
            i += 1
        return bytes(out)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        end = min(offset + length, self.size)
        runs: list[tuple[int, int, bool]] = []
        i = max(0, bisect.bisect_right(self.starts, offset) - 1)
        while i < len(self.runs) and self.runs[i][0] < end:
            start, stop, owner = self.runs[i]
            a, b = max(start, offset), min(stop, end)
            for pos, n, zero in self.layers[owner + 1].extents(a, b) if a < b else ():
                if runs and runs[-1][2] == zero:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n, zero)
                else:
                    runs.append((pos, n, zero))
            i += 1
        return runs


def open_disk(manifest_path: str | Path) -> Disk:
    """The backup a manifest names, as a disk to read from: which store, and how, follows
    from the manifest's path. Fails here (not at the first read) on a missing key or file."""
    path = Path(manifest_path)
    if not path.exists():
        raise BackupCorrupt(f"the backup's manifest {path} is missing")
    store = repository_of(path)
    if store is None:
        return ChainDisk(SecondaryStore.read_manifest(path))
    repo = store.open()
    return RepositoryDisk(repo.reader(store.read_manifest(path)))


def servable_size(manifest_path: str | Path) -> int:
    """The backup's size, once it is known that nbdkit can serve it: the manifest opens (a
    missing key or a broken chain fails here, before nbdkit) and nbdkit is installed."""
    disk = open_disk(manifest_path)
    size = disk.size
    if isinstance(disk, ChainDisk):
        disk.close()
    if shutil.which("nbdkit") is None:
        raise InvalidInput("nbdkit is not installed (Debian: nbdkit nbdkit-plugin-python)")
    return size


@dataclass
class Export:
    """A running nbdkit serving one backup."""

    process: subprocess.Popen[bytes]
    uri: str
    socket: Path | None
    size: int


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, probe: tuple) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    family, address = probe
    while True:
        if proc.poll() is not None:
            text = log.read_text(errors="replace").strip() if log.exists() else ""
            raise InvalidInput(f"nbdkit did not start: {text or f'exit {proc.returncode}'}")
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(address)
            return
        if time.monotonic() > deadline:
            raise InvalidInput(f"nbdkit did not listen within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def plugin_pythonpath() -> str:
    """The running interpreter's import path, for nbdkit's embedded Python to find
    snapferry and its dependencies (the same Python minor version)."""
    return os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))


def plugin_args(manifest_path: str | Path) -> list[str]:
    return [
        "python",
        str(PLUGIN),
        f"manifest={Path(manifest_path).absolute()}",
        f"pythonpath={plugin_pythonpath()}",
    ]


def outside_the_service(unit: str) -> list[str]:
    """Where systemd runs the host (PID 1, https://www.freedesktop.org/software/systemd/man/
    sd_booted.html: "/run/systemd/system/" exists), a process a service starts is in the
    service's cgroup and is killed with it (KillMode=control-group, the default): started
    through ``systemd-run --scope`` it is moved into a scope unit of its own first
    (systemd-run(1): "--scope ... the command is executed directly ... in a new scope unit"),
    so the same PID outlives a restart of the worker. Elsewhere: nothing to prefix."""
    if Path("/run/systemd/system").is_dir() and shutil.which("systemd-run"):
        return ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={unit}"]
    return []


def start_detached(manifest_path: str | Path, socket_path: Path, log: Path) -> int:
    """nbdkit serving the backup read-only on ``socket_path`` in a session (and, under
    systemd, a scope) of its own, outliving the process that started it: a VM running on it
    must not lose its disk when a worker stops, restarts or dies. Its PID; stopped by
    :func:`stop_detached`."""
    servable_size(manifest_path)
    args = outside_the_service(f"snapferry-export-{socket_path.stem}")
    args += ["nbdkit", "-r", "-f", "-U", str(socket_path), *plugin_args(manifest_path)]
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
        )
    _wait_ready(proc, log, (socket.AF_UNIX, str(socket_path)))
    return proc.pid


def is_our_nbdkit(pid: int, socket_path: Path) -> bool:
    """PID is an nbdkit serving ``socket_path`` (not a reused PID of something else)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(b"nbdkit") and str(socket_path).encode() in argv


def stop_detached(pid: int, socket_path: Path, *, timeout_s: float = 10.0) -> None:
    """Stop a detached nbdkit by its PID, only if it is the one serving ``socket_path``."""
    if is_our_nbdkit(pid, socket_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)
        deadline = time.monotonic() + timeout_s
        while is_our_nbdkit(pid, socket_path) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if is_our_nbdkit(pid, socket_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    socket_path.unlink(missing_ok=True)


@contextlib.contextmanager
def serving(
    manifest_path: str | Path,
    *,
    socket_path: Path | None = None,
    tcp: tuple[str, int] | None = None,
    tls_dir: Path | None = None,
) -> Iterator[Export]:
    """nbdkit serving the backup read-only for as long as the context lasts: on a unix
    socket (``socket_path``, else one in a new private directory), or on ``tcp`` with TLS
    required (certificates in ``tls_dir``: ca-cert.pem, server-cert.pem, server-key.pem)
    and a client certificate from that CA."""
    size = servable_size(manifest_path)
    private = Path(tempfile.mkdtemp(prefix="snapferry-nbd-"))  # mode 0700
    log = private / "nbdkit.log"
    made_socket: Path | None = None
    args = ["nbdkit", "-r", "-f", "--exit-with-parent"]
    if tcp is not None:
        if tls_dir is None:
            raise InvalidInput("an export on TCP needs TLS certificates")
        host, port = tcp
        args += ["-i", host, "-p", str(port), "--tls=require", f"--tls-certificates={tls_dir}"]
        args += ["--tls-verify-peer"]  # clients need a certificate from the same CA
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        probe: tuple = (family, (host, port))
        shown = f"[{host}]" if ":" in host else host
        uri = f"nbds://{shown}:{port}"
    else:
        made_socket = socket_path if socket_path is not None else private / "disk.sock"
        if made_socket.exists():
            raise InvalidInput(f"{made_socket} exists")
        args += ["-U", str(made_socket)]
        probe = (socket.AF_UNIX, str(made_socket))
        uri = f"nbd+unix:///?socket={made_socket}"
    args += plugin_args(manifest_path)
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log, "wb") as err:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        _wait_ready(proc, log, probe)
        yield Export(process=proc, uri=uri, socket=made_socket, size=size)
    finally:
        if proc is not None:
            _stop(proc)
        if made_socket is not None and socket_path is not None:
            made_socket.unlink(missing_ok=True)
        shutil.rmtree(private, ignore_errors=True)
