"""XAPI's HTTP data endpoints: ``GET /export_raw_vdi`` and ``PUT /import_raw_vdi``.

Metadata is resolved under the store lock, then bytes stream without it. Exports
announce Content-Length (XAPI does; there is no Range support, as in XAPI).
Imports are spooled to a temp file first so a broken upload never half-writes a VDI.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

from .disks import CHUNK, read_at, write_at
from .httpbase import ReplyHandler
from .model import VDI, Store, Task
from .ops import running_vm_of
from .vhd import apply_vhd, iter_vhd, plan_vhd, stream_vhd
from .xmlrpc_api import finish_task


class HttpError(Exception):
    """Answer with ``status`` and a text body like ``VDI_IN_USE <ref> import``."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


class DataHandler(ReplyHandler):
    """Mixin half of the request handler: the two data endpoints."""

    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def _session(self, q: dict[str, str]) -> str:
        morsel = SimpleCookie(self.headers.get("Cookie") or "").get("session_id")
        return q.get("session_id") or (morsel.value if morsel else "")

    def _resolve(self, q: dict[str, str], endpoint: str) -> tuple[VDI, str, Task | None]:
        """Auth, injected faults, VDI and format; raises HttpError like XAPI would."""
        store = self.store
        task = store.tasks.get(q.get("task_id", ""))
        if self._session(q) not in store.sessions:
            raise HttpError(401, "SESSION_INVALID")
        if fault := store.take_fault(endpoint):
            raise HttpError(500, " ".join(fault.description))
        vdi = store.vdi_by_ref_or_uuid(q.get("vdi", ""))
        if vdi is None:
            raise HttpError(404, f"HANDLE_INVALID VDI {q.get('vdi', '')}")
        fmt = q.get("format", "raw")
        if fmt not in ("raw", "vhd"):
            raise HttpError(400, f"unsupported format {fmt}")
        return vdi, fmt, task

    @property
    def store(self) -> Store:
        return self.server.store

    def _fail(self, exc: HttpError, task: Task | None) -> None:
        if task is not None and task.status == "pending":
            finish_task(task, "failure", error=exc.text.split())
        self.close_connection = True  # an unread request body must not be parsed as HTTP
        self._reply(exc.status, exc.text.encode())

    # ----- export ----------------------------------------------------------------

    def export_raw_vdi(self) -> None:
        q, task = self.query(), None
        files: list[BinaryIO] = []
        try:
            with self.store.lock:
                vdi, fmt, task = self._resolve(q, "export_raw_vdi")
                base = None
                if q.get("base"):
                    base = self.store.vdi_by_ref_or_uuid(q["base"])
                    if base is None:
                        raise HttpError(404, f"HANDLE_INVALID VDI {q['base']}")
                    if fmt != "vhd" or base.size != vdi.size:
                        raise HttpError(400, "base needs format=vhd and an equal-size VDI")
                files.append(open(vdi.path, "rb"))  # noqa: SIM115 - closed in finally
                if base is not None:
                    files.append(open(base.path, "rb"))  # noqa: SIM115
            src, size = files[0], vdi.size
            if fmt == "vhd":
                plan = plan_vhd(src, size, files[1] if len(files) > 1 else None)
                length, pieces = plan.length, stream_vhd(src, plan)
            else:
                length, pieces = size, _raw_pieces(src, size)
        except HttpError as exc:
            for f in files:
                f.close()
            return self._fail(exc, task)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self._write_throttled(pieces)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            if task is not None:
                finish_task(task, "failure", error=["CLIENT_ERROR", "export aborted"])
        else:
            if task is not None:
                finish_task(task, "success")
        finally:
            for f in files:
                f.close()

    def _write_throttled(self, pieces: Iterator[bytes]) -> None:
        """Honour ``/sim/export-delay`` (re-read per chunk so tests can change it live)."""
        for piece in pieces:
            step = 8192 if self.store.export_bps else 1 << 16
            for off in range(0, len(piece), step):
                chunk = piece[off : off + step]
                self.wfile.write(chunk)
                if bps := self.store.export_bps:
                    time.sleep(len(chunk) / bps)

    # ----- import ----------------------------------------------------------------

    def import_raw_vdi(self) -> None:
        q, task, tmp = self.query(), None, None
        try:
            with self.store.lock:
                vdi, fmt, task = self._resolve(q, "import_raw_vdi")
                self._check_not_in_use(vdi)
            tmp, received = self._spool(vdi.path.parent)
            with self.store.lock:
                self._check_not_in_use(vdi)
                if vdi.ref not in self.store.vdis:
                    raise HttpError(404, f"HANDLE_INVALID VDI {vdi.ref}")
                if fmt == "raw":
                    tmp = _apply_raw(tmp, received, vdi)
                else:
                    _apply_vhd_checked(tmp, vdi)
        except HttpError as exc:
            return self._fail(exc, task)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        if task is not None:
            finish_task(task, "success")
        self._reply(200, b"")

    def _check_not_in_use(self, vdi: VDI) -> None:
        vm = running_vm_of(self.store, vdi)
        if vm is not None:
            raise HttpError(409, f"VDI_IN_USE {vdi.ref} import (attached to running {vm.ref})")

    def _spool(self, directory: Path) -> tuple[Path, int]:
        """Copy the request body to a sparse temp file; returns ``(path, bytes received)``."""
        fd, name = tempfile.mkstemp(dir=directory, prefix=".import-")
        received = 0
        with os.fdopen(fd, "wb") as f:
            try:
                for chunk in self._body_chunks():
                    if chunk.count(0) == len(chunk):
                        f.seek(len(chunk), os.SEEK_CUR)
                    else:
                        f.write(chunk)
                    received += len(chunk)
                f.truncate(received)
            except HttpError:
                Path(name).unlink(missing_ok=True)
                raise
        return Path(name), received

    def _body_chunks(self) -> Iterator[bytes]:
        """Body by Content-Length or chunked transfer encoding."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass  # trailers
                    return
                data = self.rfile.read(size)
                self.rfile.readline()
                if len(data) != size:
                    raise HttpError(400, "short chunk")
                yield data
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(411, "Content-Length or chunked encoding required")
        left = int(length)
        while left > 0:
            chunk = self.rfile.read(min(CHUNK, left))
            if not chunk:
                raise HttpError(400, "short body")
            left -= len(chunk)
            yield chunk


def _raw_pieces(f: BinaryIO, size: int) -> Iterator[bytes]:
    for off in range(0, size, CHUNK):
        yield read_at(f, off, min(CHUNK, size - off))


def _apply_raw(tmp: Path, received: int, vdi: VDI) -> Path | None:
    """A whole-disk body replaces the file (keeps holes); a shorter one overwrites a prefix."""
    if received > vdi.size:
        raise HttpError(400, f"body of {received} bytes exceeds virtual_size {vdi.size}")
    if received == vdi.size:
        os.replace(tmp, vdi.path)
        return None
    with open(tmp, "rb") as f:
        for off in range(0, received, CHUNK):
            write_at(vdi.path, off, read_at(f, off, min(CHUNK, received - off)))
    return tmp


def _apply_vhd_checked(tmp: Path, vdi: VDI) -> None:
    try:
        with open(tmp, "rb") as f:
            info, blocks = iter_vhd(f)
            for _ in blocks:  # validate every block before touching the VDI
                pass
        if info.virtual_size > vdi.size:
            raise HttpError(400, f"VHD virtual size {info.virtual_size} exceeds the VDI")
        apply_vhd(tmp, vdi.path)
    except ValueError as exc:
        raise HttpError(400, f"bad VHD: {exc}") from None
