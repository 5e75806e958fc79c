"""The streamed VHD export (``GET /export_raw_vdi``) as the copy engine's reader."""

from __future__ import annotations

import contextlib
import http.client
import struct
import time
from typing import Any

import XenAPI

from ...errors import (
    CredentialsRejected,
    HypervisorUnavailable,
    SourceGone,
    UnsupportedImage,
)
from ...storage.reader import DataExtent
from ..endpoint import Endpoint
from .common import (
    IO_CHUNK,
    TASK_POLL_S,
    _failure_error,
)
from .session import XapiSession, _drop_task, _redirect_target


class VhdExportReader:
    """The copy engine's reader over one streamed VHD export (full, or a delta with base).

    What XAPI sends (``export_raw_vdi.ml``, ``vhd_tool_wrapper.ml``, vhd-tool's
    ``Vhd_input.vhd_common`` in ``vhd_format/f.ml``): ``200`` with no Content-Length, the
    body ending when the connection closes; a dynamic VHD (disk type 3) for a full export, a
    *differencing* one (type 4) whose header names the base's leaf VHD (parent unique id,
    parent name) for a delta; footer, header, BAT, then each included 2 MiB block, complete,
    behind a sector bitmap with every bit set. Errors that happen after the 200 (attaching
    the VDI, vhd-tool) show only as a short body: the export is given a task
    (``task_id=``) whose error then says why. A VDI on another host's local SR is a 302 to
    that host, which is followed with the same session.

    The engine asks for extents in guest order, which is the file order of the blocks, so
    the stream is read forward once; a request behind the stream's position (a resumed
    copy) re-opens the export, which must then describe the same blocks."""

    MAX_REDIRECTS = 3
    TASK_WAIT_S = 10.0  # for the export's task to record a failure after a short body

    def __init__(self, session: XapiSession, vdi_uuid: str, base_uuid: str | None) -> None:
        self.session, self.vdi, self.base = session, vdi_uuid, base_uuid
        self._resp: http.client.HTTPResponse | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._task: str | None = None
        self._pos = 0
        self._layout: tuple[Any, ...] | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- the request ---------------------------------------------------------------------
    def _open(self) -> None:
        self.close()
        params = {"vdi": self.vdi, "format": "vhd"}
        if self.base:
            params["base"] = self.base
        params["task_id"] = self._new_task()
        self._pos = 0
        relogged = False
        endpoint, url = self.session.endpoint, self.session.url("export_raw_vdi", **params)
        for _ in range(self.MAX_REDIRECTS + 1):
            try:
                self._conn = endpoint.connection()
                self._conn.request("GET", url)
                self._resp = self._conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise HypervisorUnavailable(f"export of VDI {self.vdi} failed: {exc}") from exc
            status = self._resp.status
            if status in (301, 302, 303, 307):
                endpoint, url = self._redirect(self._resp.getheader("Location") or "")
                self._drop_connection()
                continue
            if status == 401 and not relogged:
                # XenAPI logs in again only on an XML-RPC SESSION_INVALID; do it here.
                self._drop_connection()
                self.session.relogin()
                relogged = True
                params["task_id"] = self._new_task()  # one of the new session
                endpoint = self.session.endpoint
                url = self.session.url("export_raw_vdi", **params)
                continue
            break
        else:
            raise HypervisorUnavailable(f"export of VDI {self.vdi}: too many redirects")
        if status != 200:
            self._drop_connection()
            raise self._http_error(status)
        self._parse()

    def _redirect(self, location: str) -> tuple[Endpoint, str]:
        return _redirect_target(self.session, location, self.vdi)

    def _new_task(self) -> str:
        """A task for the export to report into (``task_id=``); the old one is destroyed."""
        if self._task is not None:
            old, self._task = self._task, None
            _drop_task(self.session, old)
        self._task = str(
            self.session.call(
                lambda x: x.task.create("snapferry export", f"export of VDI {self.vdi}"),
                "task.create",
            )
        )
        return self._task

    def _http_error(self, status: int) -> Exception:
        """Before its 200, XAPI answers 401 (the session), 500 (e.g. an unknown VDI: the
        lookup raises) or 404 (an unknown format)."""
        failed = self._task_failure(wait=False)
        if failed is not None:
            return failed
        if status == 401:
            return CredentialsRejected(
                f"XenServer refused the session for the export of {self.vdi}"
            )
        if status in (404, 500):
            for uuid in (self.vdi, self.base):
                if uuid and not self._vdi_exists(uuid):
                    return SourceGone(f"VDI {uuid} is gone (export answered HTTP {status})")
        return HypervisorUnavailable(f"export of VDI {self.vdi}: HTTP {status}")

    def _vdi_exists(self, uuid: str) -> bool:
        try:
            self.session.call(lambda x: x.VDI.get_by_uuid(uuid), "VDI.get_by_uuid")
        except SourceGone:
            return False
        return True

    def _task_failure(self, *, wait: bool) -> Exception | None:
        """The export task's error as our typed error, once it has failed (waiting a little
        for it when the body ended early), else None."""
        if self._task is None:
            return None
        task = self._task
        deadline = time.monotonic() + (self.TASK_WAIT_S if wait else 0)
        try:
            while True:
                status = self.session.call(lambda x: x.task.get_status(task), "task.get_status")
                if status not in ("pending", "cancelling") or time.monotonic() >= deadline:
                    break
                time.sleep(TASK_POLL_S)
            if status not in ("failure", "cancelled"):
                return None
            info = self.session.call(lambda x: x.task.get_error_info(task), "task.get_error_info")
        except (SourceGone, HypervisorUnavailable):
            return None
        return _failure_error(XenAPI.Failure(info or ["UNKNOWN"]), f"export of VDI {self.vdi}")

    # -- the VHD's metadata ----------------------------------------------------------------
    def _parse(self) -> None:
        footer = self._read(512)
        self._not_a_page(footer)
        if footer[:8] != b"conectix":
            raise UnsupportedImage(f"export of VDI {self.vdi} is not a VHD")
        if _vhd_checksum(footer, 64) != struct.unpack(">I", footer[64:68])[0]:
            raise HypervisorUnavailable(f"export of VDI {self.vdi}: VHD footer checksum")
        disk_type = struct.unpack(">I", footer[60:64])[0]
        wanted = 4 if self.base else 3  # f.ml vhd_common: differencing iff relative to a base
        if disk_type != wanted:
            kind = {2: "fixed", 3: "dynamic", 4: "differencing"}.get(disk_type, str(disk_type))
            raise UnsupportedImage(
                f"export of VDI {self.vdi} is a {kind} VHD; a {'delta' if self.base else 'full'}"
                f" export must be {'differencing' if self.base else 'dynamic'}"
            )
        virtual_size = struct.unpack(">Q", footer[48:56])[0]
        self._skip_to(struct.unpack(">Q", footer[16:24])[0])
        header = self._read(1024)
        self._not_a_page(header)
        if header[:8] != b"cxsparse":
            raise UnsupportedImage(f"export of VDI {self.vdi}: bad VHD dynamic header")
        if _vhd_checksum(header, 36) != struct.unpack(">I", header[36:40])[0]:
            raise HypervisorUnavailable(f"export of VDI {self.vdi}: VHD header checksum")
        table_offset = struct.unpack(">Q", header[16:24])[0]
        entries = struct.unpack(">I", header[28:32])[0]
        block_size = struct.unpack(">I", header[32:36])[0]
        parent_uid = header[40:56]
        if self.base:
            self._check_parent(parent_uid, header[64:576])
        if entries * block_size < virtual_size or block_size % 512:
            raise UnsupportedImage(f"export of VDI {self.vdi}: BAT smaller than the disk")
        self._skip_to(table_offset)
        table = self._read(4 * entries)
        self._not_a_page(table)
        bat = struct.unpack(f">{entries}I", table)
        layout = (disk_type, virtual_size, block_size, parent_uid, bat)
        if self._layout is not None:
            if layout != self._layout:  # a re-open (resume) must see the same export
                raise HypervisorUnavailable(
                    f"export of VDI {self.vdi} changed between two reads (its parent or its"
                    " blocks); the backup must start over"
                )
            return
        self._layout = layout
        self.virtual_size, self.block_size, self.parent_uid = virtual_size, block_size, parent_uid
        self._bitmap = ((block_size // 512 // 8 + 511) // 512) * 512
        self._extents = [
            DataExtent(
                start=i * block_size,
                length=min(block_size, virtual_size - i * block_size),
                path=f"vdi:{self.vdi}",
                host_offset=sector * 512 + self._bitmap,
            )
            for i, sector in enumerate(bat)
            if sector != 0xFFFFFFFF and i * block_size < virtual_size
        ]
        self._extents.sort(key=lambda e: e.host_offset)
        if [e.start for e in self._extents] != sorted(e.start for e in self._extents):
            raise UnsupportedImage(f"export of VDI {self.vdi}: blocks out of guest order")
        self._extents.sort(key=lambda e: e.start)

    def _check_parent(self, parent_uid: bytes, unicode_name: bytes) -> None:
        """A delta's header names its parent: the base's leaf VHD (f.ml l.3003-3017). Its
        uid is not visible through the API, so it must at least be set. Its name is only
        a hint: ``<uuid>.vhd`` on file SRs and ``VHD-<uuid>`` on LVHD carry the base VDI's
        UUID, but XOSTOR/LINSTOR's ``/dev/drbd/by-res/xcp-volume-<random uuid>/0`` does not
        (xcp-ng/sm ``linstorvolumemanager.py``). vhd-tool computes the delta from the two
        chains it is given (f.ml l.2771-2823), so a differencing VHD with a parent is the
        invariant that holds on every SR."""
        if parent_uid == bytes(16):
            raise UnsupportedImage(f"delta export of VDI {self.vdi} names no parent")
        self.parent_name = unicode_name.decode("utf-16-be", errors="replace").split("\0", 1)[0]

    def _not_a_page(self, data: bytes) -> None:
        """A failure after the 200 is followed by Http_svr's whole ``HTTP/1.1 500`` page in
        the body (``http_svr.ml`` ``response_internal_error``; xen-api#4603), at whatever
        read it lands on. No VHD structure starts with ``HTTP/`` (footer ``conectix``,
        header ``cxsparse``, a BAT entry that large, a bitmap of set bits): the task says
        what failed, a transient error until it says otherwise."""
        if data[:5] == b"HTTP/":
            failed = self._task_failure(wait=True)
            raise failed or HypervisorUnavailable(
                f"export of VDI {self.vdi} failed at {self._pos - len(data)}: XAPI's error"
                f" page in the body ({data[:60]!r})"
            )

    def _read(self, n: int) -> bytes:
        assert self._resp is not None
        try:
            data = self._resp.read(n)
        except (OSError, http.client.HTTPException) as exc:
            raise HypervisorUnavailable(f"export of VDI {self.vdi} broke: {exc}") from exc
        if len(data) != n:
            # XAPI has sent its 200 before it attaches the VDI and runs vhd-tool: a failure
            # after that is a short body, and the export's task says why.
            failed = self._task_failure(wait=True)
            if failed is not None:
                raise failed
            raise HypervisorUnavailable(f"export of VDI {self.vdi} ended early at {self._pos}")
        self._pos += n
        return data

    def _skip_to(self, offset: int) -> None:
        from ...storage.liveness import alive

        if offset < self._pos:
            self._open()  # behind us (a resume): the export has no Range, start again
        while self._pos < offset:
            self._read(min(IO_CHUNK, offset - self._pos))
            # Reading and dropping a long stretch of export is progress, not a stall.
            alive()

    def data_extents(self) -> list[DataExtent]:
        return list(self._extents)

    def read_range(self, extent: DataExtent, guest_offset: int, view: memoryview) -> None:
        if guest_offset == extent.start:  # a block's sector bitmap: every sector present?
            self._skip_to(extent.host_offset - self._bitmap)
            bitmap = self._read(self._bitmap)
            self._not_a_page(bitmap)
            needed = (extent.length + 511) // 512
            if bitmap[: needed // 8] != b"\xff" * (needed // 8):
                raise UnsupportedImage(
                    f"export of VDI {self.vdi}: partially present block at {extent.start}"
                )
        self._skip_to(extent.host_offset + (guest_offset - extent.start))
        view[:] = self._read(len(view))

    def blocks(self, block_size: int) -> set[int]:
        """The disk's ``block_size`` blocks the export carries (for a full export: those
        allocated anywhere in the VDI's chain, f.ml ``Vhd_input.vhd_common``)."""
        found: set[int] = set()
        for e in self._extents:
            found.update(range(e.start // block_size, (e.start + e.length - 1) // block_size + 1))
        return found

    def read_to_end(self) -> None:
        """Read the rest of the export, dropping it, and check that it succeeded. XAPI
        detaches the VDI from dom0 once vhd-tool has sent everything, before the handler
        returns, and closes the connection only after that (``export_raw_vdi.ml`` l.24
        ``req.Http.Request.close <- true``; ``http_svr.ml`` l.536, l.599-604: the socket
        closes once the handler returned; ``with_block_attached_device``'s clean-up
        unplugs and destroys dom0's VBD first, ``attach_helpers.ml`` l.71-86): after the
        end, an import's RW attach meets no RO datapath of this export, as it would after
        a dropped one (a failed unplug is only logged there: the import then meets
        ``Illegal_transition``, ChainBusy, retried)."""
        from ...storage.liveness import alive

        assert self._resp is not None
        while True:
            try:
                data = self._resp.read(IO_CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise HypervisorUnavailable(f"export of VDI {self.vdi} broke: {exc}") from exc
            if not data:
                break
            self._pos += len(data)
            alive()
        failed = self._task_failure(wait=True)
        if failed is not None:
            raise failed

    def _drop_connection(self) -> None:
        """Close the socket without reading on: the body has no length, so reading to its
        end would pull the rest of the disk through."""
        if self._resp is not None:
            with contextlib.suppress(OSError, http.client.HTTPException):
                self._resp.close()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        self._conn = self._resp = None

    def close(self) -> None:
        self._drop_connection()
        if self._task is not None:
            task, self._task = self._task, None
            _drop_task(self.session, task)


def _vhd_checksum(buf: bytes, at: int) -> int:
    """The VHD checksum of a footer or header: ones' complement of the byte sum, with the
    checksum field itself (4 bytes at ``at``) counted as zero."""
    return ~(sum(buf) - sum(buf[at : at + 4])) & 0xFFFFFFFF
