"""XAPI's HTTP data endpoints: ``GET /export_raw_vdi`` and ``PUT /import_raw_vdi``.

Metadata is resolved under the store lock, then bytes stream without it. The export
answers as ``ocaml/xapi/export_raw_vdi.ml`` does (xen-api e2ee48d688):

- ``handler``: credentials first (``Xapi_http.assert_credentials_ok``: a bad session is
  ``Http.Unauthorised`` -> 401); then ``Importexport.vdi_of_req`` (a ref, else
  ``Db.VDI.get_by_uuid``): an unknown VDI raises before any header is sent -> 500.
- ``export_raw``: a VDI on an SR this host cannot see (another host's local SR) is a 302
  to that host, same path and query (``Importexport.return_302_redirect``; XAPI's scheme is
  ``https``, the simulator's ``http``, as it has no TLS).
- ``localhost_handler``: ``http_200_ok ~keep_alive:false`` with ``task-id``,
  ``content-type`` and ``content-disposition`` and *no* Content-Length: the body ends
  when the connection closes. Only after these headers does it read ``base``
  (``base_vdi_of_req``), check ``VDI_TOO_LARGE``, attach the VDIs and run vhd-tool; any
  failure there marks the request's task failed (``TaskHelper.failed``, the task named by
  ``task_id=`` when given, ``Context.get_task_id``) and closes the connection: a short
  body. vhd-tool exiting non-zero is ``VDI_IO_ERROR`` (``vhd_tool_wrapper.ml``). A
  forwarded task is completed on success too (``xapi_http.ml`` ``with_context`` ->
  ``server_helpers.ml`` ``exec_with_forwarded_task``, ``need_complete:true``). The 401 of
  ``assert_credentials_ok`` comes before any task is touched.
- No Range support. ``format=raw`` with ``base`` streams the included blocks and zeros
  elsewhere (f.ml ``Vhd_input.raw_common``).

Injected ``export_raw_vdi`` faults fail the export after the 200 (at ``at_byte`` of the
body), as the real failures (attach, I/O) do. Imports are spooled to a temp file first so a
broken upload never half-writes a VDI.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

from .disks import CHUNK, read_at, write_at
from .dom0 import error_page
from .httpbase import ReplyHandler
from .model import BLOCK, SR, VDI, Store, Task, XapiError
from .vhd import _VHD_EPOCH, Parent, apply_vhd, iter_vhd, plan_vhd, stream_vhd
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
        q, store = self.query(), self.store
        self.close_connection = True  # keep_alive:false, whatever happens
        with store.lock:
            task = store.tasks.get(q.get("task_id", ""))
            if not store.session_valid(self._session(q)) or store.take_fault("export_raw_vdi:401"):
                return self._reply(401, b"SESSION_INVALID")
            vdi = store.vdi_by_ref_or_uuid(q.get("vdi", ""))
            if vdi is None:  # Db.VDI.get_by_uuid raises before any header: a 500
                return self._reply(500, f"UUID_INVALID VDI {q.get('vdi', '')}".encode())
            sr = store.srs[vdi.sr]
            if not store.sr_visible(sr, self.server.host_ref):  # export_raw_vdi.ml l.130-135
                return self._redirect(store.host_address[store.host_for_sr(sr)])
            fmt = q.get("format", "raw")
            if fmt not in ("raw", "vhd"):  # localhost_handler: `Unknown -> 404, task failed
                if task is not None:
                    finish_task(task, "failure", error=["INTERNAL_ERROR", f"Unknown format {fmt}"])
                return self._reply(404, b"")
        self.send_response(200)
        if task is not None:
            self.send_header("task-id", task.ref)
        self.send_header("Content-Type", "application/octet-stream")
        name = f"{vdi.uuid}.{fmt}"
        self.send_header("Content-Disposition", f'attachment; filename="{name}"')
        self.send_header("Connection", "close")
        self.end_headers()
        files: list[BinaryIO] = []
        host, held, dropped = self.server.host_ref, [], False
        try:
            with store.lock:
                pieces, at_byte, fault = self._export_pieces(q, vdi, fmt, files)
                # with_block_attached_device ... `RO (export_raw_vdi.ml l.94-101): the
                # VDI, and the base, on a dom0 datapath each for as long as vhd-tool runs.
                if files:  # the export got as far as vhd-tool
                    base = store.vdi_by_ref_or_uuid(q["base"]) if q.get("base") else None
                    for one in [vdi] + ([base] if base is not None else []):
                        held.append((one.ref, store.datapaths.attach(host, one.ref, "RO")))
            self._write_throttled(pieces, at_byte)
            if fault is not None:
                raise fault
        except XapiError as exc:
            # After the 200: TaskHelper.failed, then the exception reaches Http_svr, which
            # writes its 500 page into the body (export_raw_vdi.ml l.117-120; dom0.py).
            if task is not None:
                finish_task(task, "failure", error=exc.description)
            with contextlib.suppress(OSError):
                self.wfile.write(error_page(exc))
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
            if task is not None:
                finish_task(task, "failure", error=["CLIENT_ERROR", "export aborted"])
        else:
            if task is not None:
                finish_task(task, "success", result="")
        finally:
            for f in files:
                f.close()
            for ref, dp in held:
                store.datapaths.release(host, ref, dp, linger=dropped)

    def _redirect(self, address: str) -> None:
        self.send_response(302)
        self.send_header("Location", f"http://{address}{self.path}")
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def _export_pieces(
        self, q: dict[str, str], vdi: VDI, fmt: str, files: list[BinaryIO]
    ) -> tuple[Iterator[bytes], int | None, XapiError | None]:
        """What vhd-tool would stream, or the error after the 200 (and where it hits)."""
        store = self.store
        fault = store.take_fault("export_raw_vdi")
        at_byte = store.fault_at_byte.get("export_raw_vdi", 0) if fault else None
        base = None
        if q.get("base"):
            base = store.vdi_by_ref_or_uuid(q["base"])
            if base is None:  # base_vdi_of_req runs after the headers
                return iter(()), 0, XapiError("UUID_INVALID", "VDI", q["base"])
            # A base of another size (a resize between the two) is no error: vhd-tool walks
            # the target's BAT and looks each block up on the other chain (f.ml l.2820,
            # ``i < BAT.length bat``); the stream has the target's size.
            if "vhd" not in (vdi.image_format, base.image_format) or vdi.image_format != "vhd":
                # vhd_tool_wrapper.ml send, l.159-174: a base given and a source that is no
                # VHD (raw, QCOW2, NBD-only) -> failwith, which XAPI reports as
                # INTERNAL_ERROR (ExnHelper); after the 200, as every send error.
                msg = "Cannot compute differences on non-VHD images"
                return iter(()), 0, XapiError("INTERNAL_ERROR", msg)
            if base.image_format != "vhd":  # l.175-189: the base is no VHD
                msg = "Vhd_tool_wrapper.send: base VDI is not a vhd; cannot compute differences"
                return iter(()), 0, XapiError("INTERNAL_ERROR", msg)
        files.append(open(vdi.path, "rb"))  # noqa: SIM115 - closed by the caller
        if base is None:
            blocks, parent = vdi.allocated(), None
        else:
            blocks, parent = changed_blocks(vdi, base), _parent_of(store.srs[base.sr], base)
        if fmt == "vhd":
            pieces = stream_vhd(files[0], plan_vhd(vdi.size, blocks, parent))
        elif base is None:
            pieces = _raw_pieces(files[0], vdi.size)
        else:
            pieces = _raw_blocks(files[0], vdi.size, blocks)
        return pieces, at_byte, fault

    def _write_throttled(self, pieces: Iterator[bytes], stop_at: int | None = None) -> int:
        """Honour ``/sim/export-delay`` (re-read per chunk so tests can change it live);
        stop after ``stop_at`` bytes (a failure mid-stream). Returns the bytes sent."""
        sent = 0
        for piece in pieces:
            step = 8192 if self.store.export_bps else 1 << 16
            for off in range(0, len(piece), step):
                chunk = piece[off : off + step]
                if stop_at is not None and sent + len(chunk) > stop_at:
                    chunk = chunk[: stop_at - sent]
                self.wfile.write(chunk)
                sent += len(chunk)
                if stop_at is not None and sent >= stop_at:
                    return sent
                if bps := self.store.export_bps:
                    time.sleep(len(chunk) / bps)
        return sent

    # ----- import ----------------------------------------------------------------

    def import_raw_vdi(self) -> None:
        """``import_raw_vdi.ml``: the checks, the 302, then ``200 OK`` *before* any byte of
        the body is read (l.172-179), then the RW attach and vhd-tool (l.188-205). A failure
        after the 200 fails the task (``task_id=`` is adopted: ``xapi_http.ml``
        ``with_context``) and is re-raised (l.228-232), so Http_svr writes its 500 page into
        the body and closes, the rest of the body unread. Success completes the task with
        the VDI's ref (l.220). XAPI never answers 409: a running VM's VDI can be imported
        into, as dom0's VBDs are exempt from the sharing check (``xapi_vbd_helpers.ml``
        l.288-319)."""
        q, store, host = self.query(), self.store, self.server.host_ref
        self.close_connection = True  # req.Request.close <- true (l.40)
        with store.lock:
            task = store.tasks.get(q.get("task_id", ""))
            if not store.session_valid(self._session(q)):
                return self._reply(401, b"SESSION_INVALID")
            vdi = store.vdi_by_ref_or_uuid(q.get("vdi", ""))
            if vdi is None:
                return self._fail(HttpError(404, f"HANDLE_INVALID VDI {q.get('vdi', '')}"), task)
            sr = store.srs[vdi.sr]
            if not store.sr_visible(sr, host):  # import, l.256-262: before the body is read
                return self._redirect(store.host_address[store.host_for_sr(sr)])
            fmt = q.get("format", "raw")
            if fmt not in ("raw", "vhd"):  # l.48-65: task failed, 404
                return self._fail(HttpError(404, f"INTERNAL_ERROR Unknown format {fmt}"), task)
        self.send_response(200)
        if task is not None:
            self.send_header("task-id", task.ref)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()
        fault = store.take_fault("import_raw_vdi")
        stop_at = store.fault_at_byte.get("import_raw_vdi", 0) if fault else None
        dp, tmp = None, None
        try:
            dp = store.datapaths.attach(host, vdi.ref, "RW")
            try:
                tmp, received = self._spool(vdi.path.parent, stop_at)
            except HttpError as exc:  # vhd-tool meets the end of the body early
                raise XapiError("VDI_IO_ERROR", exc.text) from None
            with store.lock:
                if vdi.ref not in store.vdis:
                    raise XapiError("HANDLE_INVALID", "VDI", vdi.ref)
                if fault is not None:  # vhd-tool wrote what it had read, then failed
                    if fmt == "raw":
                        _apply_raw(tmp, min(received, vdi.size), vdi)
                    raise fault
                if fmt == "vhd" and must_write_zeroes(sr, vdi):
                    # vhd-tool serve_vhd_to_raw (impl.ml l.582-583): failwith
                    # "unimplemented: prezeroed"; it exits non-zero, which
                    # vhd_tool_wrapper.ml (l.64-71) raises as VDI_IO_ERROR
                    raise XapiError("VDI_IO_ERROR", "Device I/O errors")
                try:
                    if fmt == "raw":
                        tmp = _apply_raw(tmp, received, vdi)
                    else:
                        _apply_vhd_checked(tmp, vdi)
                except HttpError as exc:
                    raise XapiError("VDI_IO_ERROR", exc.text) from None
        except XapiError as exc:
            if task is not None:
                finish_task(task, "failure", error=exc.description)
            with contextlib.suppress(OSError):
                self.wfile.write(error_page(exc))
        else:
            if task is not None:
                finish_task(task, "success", result=f"<value>{vdi.ref}</value>")
        finally:
            if dp is not None:
                store.datapaths.release(host, vdi.ref, dp)
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def _spool(self, directory: Path, stop_at: int | None = None) -> tuple[Path, int]:
        """Copy the request body (its first ``stop_at`` bytes) to a sparse temp file;
        returns ``(path, bytes received)``."""
        fd, name = tempfile.mkstemp(dir=directory, prefix=".import-")
        received = 0
        with os.fdopen(fd, "wb") as f:
            try:
                for chunk in self._body_chunks():
                    if stop_at is not None and received + len(chunk) >= stop_at:
                        chunk = chunk[: stop_at - received]
                        f.write(chunk)
                        received += len(chunk)
                        break
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


def _raw_blocks(f: BinaryIO, size: int, blocks: set[int]) -> Iterator[bytes]:
    """A raw delta: the included blocks' bytes, zeros elsewhere (``raw_common``)."""
    for i in range(-(-size // BLOCK)):
        length = min(BLOCK, size - i * BLOCK)
        yield read_at(f, i * BLOCK, length) if i in blocks else bytes(length)


def changed_blocks(vdi: VDI, base: VDI) -> set[int]:
    """vhd-tool's ``include_block`` with ``from``: the blocks allocated by any VHD that is
    on exactly one of the two chains (f.ml l.2801-2823, keyed by footer uid + name)."""
    mine, theirs = {id(x) for x in vdi.chain}, {id(x) for x in base.chain}
    only = [x for x in vdi.chain if id(x) not in theirs]
    only += [x for x in base.chain if id(x) not in mine]
    return set().union(*(x.blocks for x in only))


def _parent_of(sr: SR, base: VDI) -> Parent:
    """The base's leaf VHD as vhd-tool sees it: its uid, file name and mtime (f.ml l.3004).
    The name is the path tapdisk has open: ``/var/run/sr-mount/<sr>/<uuid>.vhd`` on file
    SRs (ext, nfs: SM FileSR), ``/dev/VG_XenStorage-<sr>/VHD-<uuid>`` on LVHD (SM LVHDSR),
    and ``/dev/drbd/by-res/xcp-volume-<random uuid>/0`` on XOSTOR/LINSTOR, whose volume
    name carries no VDI UUID (xcp-ng/sm drivers/linstorvolumemanager.py l.619-650,
    2000-2014)."""
    mtime = int(base.path.stat().st_mtime) if base.path.exists() else _VHD_EPOCH
    if sr.type in ("lvm", "lvmoiscsi", "lvmohba"):
        name = f"/dev/VG_XenStorage-{sr.uuid}/VHD-{base.uuid}"
    elif sr.type == "linstor":
        name = f"/dev/drbd/by-res/{base.volume_name}/0"
    else:
        name = f"/var/run/sr-mount/{sr.uuid}/{base.uuid}.vhd"
    return Parent(uid=base.chain[0].uid, filename=name, time_stamp=max(mtime - _VHD_EPOCH, 0))


def must_write_zeroes(sr: SR, vdi: VDI) -> bool:
    """``Sm_fs_ops.must_write_zeroes_into_new_vdi`` (sm_fs_ops.ml l.66-95): a VDI on a
    legacy LVM SR (lvm, lvmoiscsi, lvmohba without ``use_vhd=true``) or a raw VDI asked of
    one (``sm_config`` ``type=raw``, xha_statefile.ml l.27) is not pre-zeroed; the
    EqualLogic and StorageLink cases are not modelled."""
    lvm = sr.type.lower() in ("lvm", "lvmoiscsi", "lvmohba")
    raw = vdi.image_format == "raw"
    return lvm and (raw or sr.sm_config.get("use_vhd") != "true")


def _apply_raw(tmp: Path, received: int, vdi: VDI) -> Path | None:
    """A whole-disk body replaces the file (keeps holes); a shorter one overwrites a prefix.
    vhd-tool writes every byte of a raw body, zeros included (serve_raw_to_raw, impl.ml
    l.1298-1326), and tapdisk allocates each block a write lands in that has no BAT entry
    yet, whatever the data (blktap drivers/block-vhd.c vhd_queue_write l.2146-2180,
    VHD_BM_BAT_CLEAR): every block of the body is allocated."""
    if received > vdi.size:
        raise HttpError(400, f"body of {received} bytes exceeds virtual_size {vdi.size}")
    vdi.chain[0].blocks |= set(range((received + BLOCK - 1) // BLOCK))
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
        with open(tmp, "rb") as f:
            _, present = iter_vhd(f)
            vdi.chain[0].blocks |= {i * info.block_size // BLOCK for i, _, _ in present}
    except ValueError as exc:
        raise HttpError(400, f"bad VHD: {exc}") from None
