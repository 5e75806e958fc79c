"""XenServer through XenAPI: VDI snapshots on primary, VHD deltas chained on secondary.

Take: ``Async.VDI.snapshot`` of the volume's VDI, with task polling; the snapshot VDI is
labelled ``snapferry-<id>`` so that a retried take finds it.

Backup: ``GET /export_raw_vdi?format=vhd``, streamed into the copy engine. The plan
(``plan_backup``) follows CloudStack: a delta against the newest backed-up snapshot while its
VDI is still on primary and fewer than ``snapshot.delta.max`` deltas follow the last full
(``SNAPFERRY_SNAPSHOT_DELTA_MAX``, default 16), else a full. The VHD's block allocation table
says which 2 MiB blocks the export carries; those are the delta's extents, recorded in its
manifest with its parent. The export has no Range support, so a resumed backup re-opens it
and skips (reads and drops) what it already has: the network repeats, the store does not.

Primary snapshots: after a verified backup, the snapshot is marked released and every other
released snapferry snapshot of the volume is destroyed, so only the newest stays on primary,
as the next delta's base (CloudStack keeps exactly one). Unreleased ones (a backup pending
or failed) are never destroyed.

Restore (revert, new volume): the chain is rebuilt on secondary (full + deltas, each link
verified) and written with ``PUT /import_raw_vdi``, then read back and compared.

VM snapshots: ``VM.snapshot`` (Disk) or ``VM.checkpoint`` (DiskAndMemory), named
``snapferry-vm-<id>``; ``VM.revert``; delete destroys the snapshot VM and its VDIs.

A VM is named by its UUID or its label. ``VM.get_by_name_label`` answers every VM object
with that label: templates, snapshots (labelled as their creator chose, possibly like the VM)
and control domains are dropped, and a label that still names several VMs is refused with
their UUIDs, so that no operation acts on a VM the operator did not mean.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import struct
import threading
import time
import urllib.parse
import xmlrpc.client
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import XenAPI

from ..contracts import (
    BackupPlan,
    DiscardRequest,
    PrimarySnapshot,
    RestoreRequest,
    RestoreResult,
    RevertRequest,
    VmSnapshotOperation,
    VmSnapshotTaken,
    VmSnapshotType,
    VolumeRef,
)
from ..errors import (
    ChainBusy,
    CredentialsRejected,
    DiskNotFound,
    HypervisorUnavailable,
    InvalidInput,
    SourceGone,
    UnsupportedImage,
    VmNotFound,
)
from ..settings import Settings, XenConfig
from ..storage.reader import DataExtent
from ..storage.secondary import Manifest
from .base import HypervisorDriver
from .endpoint import Endpoint

VOLUME_PREFIX = "snapferry-"
VM_PREFIX = "snapferry-vm-"
RELEASED = "snapferry: released"
TAKE_KEY = "snapferry-take"  # on a VDI's other_config while a take snapshots it
TASK_POLL_S = 0.05  # the first poll of a task; then doubling up to TASK_POLL_MAX_S
TASK_POLL_MAX_S = 1.0
IO_CHUNK = 8 * 1024 * 1024
NULL_REF = "OpaqueRef:NULL"

_VOLUME_LABEL = re.compile(VOLUME_PREFIX + r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")
_UUID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", re.IGNORECASE)

_vm_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


def _failure_error(exc: XenAPI.Failure, what: str) -> Exception:
    """XAPI's error codes as our typed errors: gone and refused are permanent, busy retries."""
    code, *params = [str(x) for x in exc.details] or ["UNKNOWN"]
    message = f"{what}: {code} {params}"
    if code == "SESSION_AUTHENTICATION_FAILED":
        return CredentialsRejected(f"XenServer rejected the credentials ({what})")
    if code in ("HANDLE_INVALID", "UUID_INVALID"):
        return SourceGone(message)
    # SR_BACKEND_FAILURE_109: the VHD chain is too long (SM's limit is 30) until the SR's
    # garbage collector coalesces it; like a busy VDI, that passes with time.
    if code in (
        "VDI_IN_USE",
        "OTHER_OPERATION_IN_PROGRESS",
        "SR_BACKEND_FAILURE_46",
        "SR_BACKEND_FAILURE_109",
    ):
        return ChainBusy(message)
    if code == "VDI_TOO_LARGE":  # a VHD export above 2040 GiB (export_raw_vdi.ml)
        return UnsupportedImage(message)
    if code == "VM_BAD_POWER_STATE":
        return InvalidInput(message)
    return HypervisorUnavailable(message)


_DEVICE = re.compile(r"(?:xvd|hd|sd|vd)([a-p])")


def _userdevice(disk: str) -> str | None:
    """The VBD slot a disk name means: ``xvdb``/``hdb``/``sdb`` -> "1", "1" -> "1"."""
    if disk.isdigit():
        return str(int(disk))
    match = _DEVICE.fullmatch(disk)
    return str(ord(match.group(1)) - ord("a")) if match else None


def _not_a_vm(record: dict[str, Any]) -> str:
    """What a VM record is when it is no VM to act on ('' when it is one)."""
    if record.get("is_a_snapshot"):
        return "a VM snapshot"
    if record.get("is_a_template"):
        return "a template"
    if record.get("is_control_domain"):
        return "a control domain"
    return ""


class XapiSession:
    """One logged-in XenAPI session per process, used from many threads at once.

    The XML-RPC transport of a ``XenAPI.Session`` (``xmlrpc.client.ServerProxy``) is not
    thread-safe, so each thread gets its own proxy carrying the one shared session
    reference: concurrent calls of one worker overlap instead of queueing behind a
    process-wide lock (XAPI serves each connection on its own thread). Only login is
    serialised. A proxy never logs in by itself: SESSION_INVALID comes back as XenAPI's
    ``Fault(401)``, and the shared session is renewed once for everyone."""

    def __init__(self, config: XenConfig) -> None:
        self.config = config
        self.master_url = config.url  # the pool master; it moves on HOST_IS_SLAVE
        self.endpoint = Endpoint.from_url(config.url, verify_tls=config.verify_tls)
        self._ref: str | None = None  # the shared session reference
        self._lock = threading.Lock()  # guards login and the reference
        self._local = threading.local()

    def _login(self) -> Any:
        for _ in range(3):
            session = XenAPI.Session(self.master_url, ignore_ssl=not self.config.verify_tls)
            try:
                session.xenapi.login_with_password(
                    self.config.user, self.config.password(), "2.0", "snapferry"
                )
            except XenAPI.Failure as exc:
                if self._follow_master(exc):
                    continue
                raise _failure_error(exc, f"logging in to {self.master_url}") from exc
            except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
                raise HypervisorUnavailable(
                    f"cannot reach XenServer at {self.master_url}: {exc}"
                ) from exc
            return session
        raise HypervisorUnavailable(f"XenServer at {self.master_url}: no pool master answers")

    def _follow_master(self, exc: XenAPI.Failure) -> bool:
        """``HOST_IS_SLAVE [master address]``: this host is a pool member now (a master
        failover); talk to the master it names, with the configured scheme and port."""
        details = [str(x) for x in exc.details]
        if len(details) < 2 or details[0] != "HOST_IS_SLAVE" or not details[1]:
            return False
        parts = urllib.parse.urlsplit(self.master_url)
        address = details[1]
        if address.count(":") > 1 and not address.startswith("["):  # an IPv6 literal
            address = f"[{address}]"
        if parts.port and not re.search(r":\d+$", address.rsplit("]", 1)[-1]):
            address = f"{address}:{parts.port}"
        self.master_url = f"{parts.scheme or 'https'}://{address}"
        self.endpoint = Endpoint.from_url(self.master_url, verify_tls=self.config.verify_tls)
        self._ref = None  # the proxies follow: _proxy() compares their URL
        return True

    def _proxy(self) -> Any:
        """This thread's proxy, logged in as the shared session."""
        ref = self.session_ref()
        proxy = getattr(self._local, "proxy", None)
        if proxy is None or getattr(self._local, "url", None) != self.master_url:
            proxy = XenAPI.Session(self.master_url, ignore_ssl=not self.config.verify_tls)
            self._local.proxy, self._local.url = proxy, self.master_url
        proxy._session = ref
        return proxy

    def _renew(self, stale: str | None) -> None:
        """A new shared session, unless another thread renewed it already."""
        with self._lock:
            if self._ref == stale:
                self._ref = str(self._login()._session)

    def call(self, fn: Callable[[Any], Any], what: str) -> Any:
        """``fn(session.xenapi)`` with XAPI failures mapped to our errors."""
        for attempt in range(3):
            proxy = self._proxy()
            ref = proxy._session
            try:
                return fn(proxy.xenapi)
            except XenAPI.Failure as exc:
                # HOST_IS_SLAVE when the master failed over: follow it, once.
                if attempt == 0 and self._follow_master(exc):
                    continue
                raise _failure_error(exc, what) from exc
            except xmlrpc.client.Fault as exc:
                if exc.faultCode == 401 and attempt < 2:  # SESSION_INVALID: XenAPI's 401
                    self._renew(ref)
                    continue
                # not XAPI's envelope: a proxy in between, a bad URL
                raise HypervisorUnavailable(f"{what}: XML-RPC fault {exc.faultString}") from exc
            except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
                self._local.proxy = None  # a broken connection: a new proxy next time
                raise HypervisorUnavailable(f"{what}: XenServer unreachable: {exc}") from exc
        raise HypervisorUnavailable(f"{what}: the session or the pool master kept changing")

    def relogin(self) -> None:
        """A fresh session (an HTTP 401: XenAPI re-logs in only for XML-RPC calls)."""
        self._renew(self._ref)

    def session_ref(self) -> str:
        with self._lock:
            if self._ref is None:
                self._ref = str(self._login()._session)
            return self._ref

    def connection(self) -> http.client.HTTPConnection:
        return self.endpoint.connection()

    def url(self, endpoint: str, **params: str) -> str:
        query = urllib.parse.urlencode({"session_id": self.session_ref(), **params})
        return f"/{endpoint}?{query}"


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
            with contextlib.suppress(Exception):
                self.session.call(lambda x: x.task.destroy(old), "task.destroy")
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
        bat = struct.unpack(f">{entries}I", self._read(4 * entries))
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
        uid is not visible through the API, so it must at least be set; its file name
        (``<uuid>.vhd`` on file SRs, ``VHD-<uuid>`` on LVM, dashes doubled under
        /dev/mapper) must contain the base VDI's UUID."""
        if parent_uid == bytes(16):
            raise UnsupportedImage(f"delta export of VDI {self.vdi} names no parent")
        name = unicode_name.decode("utf-16-be", errors="replace").split("\0", 1)[0]
        assert self.base is not None
        if name and self.base.replace("-", "").lower() not in name.replace("-", "").lower():
            raise UnsupportedImage(
                f"delta export of VDI {self.vdi} is relative to {name!r}, not to base VDI"
                f" {self.base}"
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
        from ..storage.liveness import alive

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
            needed = (extent.length + 511) // 512
            if bitmap[: needed // 8] != b"\xff" * (needed // 8):
                raise UnsupportedImage(
                    f"export of VDI {self.vdi}: partially present block at {extent.start}"
                )
        self._skip_to(extent.host_offset + (guest_offset - extent.start))
        view[:] = self._read(len(view))

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
            with contextlib.suppress(Exception):
                self.session.call(lambda x: x.task.destroy(task), "task.destroy")


def _redirect_target(session: XapiSession, location: str, vdi: str) -> tuple[Endpoint, str]:
    """XAPI's 302 (``Importexport.return_302_redirect``) names the host that sees the VDI's
    SR, with the request's path and query (so the session goes along; added if missing)."""
    parts = urllib.parse.urlsplit(location)
    if not parts.hostname:
        raise HypervisorUnavailable(f"VDI {vdi}: bad redirect {location!r}")
    scheme = parts.scheme or session.endpoint.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    endpoint = Endpoint(scheme, parts.hostname, port, session.endpoint.verify_tls)
    if "session_id" not in urllib.parse.parse_qs(parts.query):
        extra = urllib.parse.urlencode({"session_id": session.session_ref()})
        parts = parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra)
    return endpoint, f"{parts.path or '/export_raw_vdi'}?{parts.query}"


def _vhd_checksum(buf: bytes, at: int) -> int:
    """The VHD checksum of a footer or header: ones' complement of the byte sum, with the
    checksum field itself (4 bytes at ``at``) counted as zero."""
    return ~(sum(buf) - sum(buf[at : at + 4])) & 0xFFFFFFFF


class XenServerDriver(HypervisorDriver):
    def __init__(self, settings: Settings) -> None:
        if settings.xen is None:
            raise InvalidInput("XenServer needs SNAPFERRY_XEN_URL (and user and password)")
        self.config = settings.xen
        self.delta_max = settings.delta_max
        self.session = XapiSession(settings.xen)

    def _api(self, method: str, *args: Any) -> Any:
        """One XenAPI call by its name (``"VDI.snapshot"``, ``"Async.VM.revert"``)."""

        def call(xenapi: Any) -> Any:
            fn = xenapi
            for part in method.split("."):
                fn = getattr(fn, part)
            return fn(*args)

        return self.session.call(call, method)

    # -- lookups ---------------------------------------------------------------------------
    def _vm(self, name: str) -> str:
        """The one VM ``name`` means: a UUID is looked up as one, anything else as a label.
        Templates, snapshots and control domains are not VMs to act on; a label that names
        more than one VM is refused (listing their UUIDs) rather than guessed."""
        where = f"on XenServer {self.config.url}"
        if _UUID.fullmatch(name):
            ref = self._vm_by_uuid(name.lower())
            if ref is None:
                raise VmNotFound(f"no VM has UUID {name} {where}")
            kind = _not_a_vm(self._api("VM.get_record", ref))
            if kind:
                raise VmNotFound(f"UUID {name} {where} is {kind}, not a VM")
            return ref
        records = {
            str(r): self._api("VM.get_record", r) for r in self._api("VM.get_by_name_label", name)
        }
        vms = {r: rec for r, rec in records.items() if not _not_a_vm(rec)}
        if not vms:
            others = ", ".join(sorted(_not_a_vm(rec) for rec in records.values()))
            also = f" (the name belongs only to: {others})" if others else ""
            raise VmNotFound(f"VM {name!r} does not exist {where}{also}")
        if len(vms) > 1:
            listing = ", ".join(
                f"{rec['uuid']} ({rec['power_state']})"
                for rec in sorted(vms.values(), key=lambda rec: str(rec["uuid"]))
            )
            raise InvalidInput(
                f"{len(vms)} VMs are named {name!r} {where}: {listing}; name the VM by its"
                " UUID instead"
            )
        return next(iter(vms))

    def _vm_by_uuid(self, uuid: str) -> str | None:
        def call(xenapi: Any) -> Any:
            try:
                return xenapi.VM.get_by_uuid(uuid)
            except XenAPI.Failure as exc:
                if exc.details and exc.details[0] == "UUID_INVALID":
                    return None
                raise

        ref = self.session.call(call, "VM.get_by_uuid")
        return None if ref is None else str(ref)

    def _vdis(self, vm: str) -> dict[str, str]:
        """The VM's disks by ``VBD.userdevice`` ("0", "1", ...) -> VDI ref. Not by
        ``VBD.device``: XAPI leaves it "" until the VM boots, and for disks attached while
        it is halted (xapi_vbd.ml, ``create``), and HVM guests call them hda..hdd;
        userdevice is the slot, fixed from the start (as CloudStack keys them)."""
        disks = {}
        for vbd in self._api("VM.get_VBDs", vm):
            if self._api("VBD.get_type", vbd) != "Disk":
                continue
            vdi = self._api("VBD.get_VDI", vbd)
            if vdi != NULL_REF:
                disks[str(self._api("VBD.get_userdevice", vbd))] = vdi
        return disks

    def _vdi(self, vm: str, vm_name: str, disk: str) -> str:
        """``--disk`` as a device name (``xvda``, ``hda``, ``sda``: its letter is the slot)
        or as the userdevice number itself."""
        disks = self._vdis(vm)
        slot = _userdevice(disk)
        if slot is None or slot not in disks:
            have = ", ".join(
                f"xvd{chr(97 + int(d))} (userdevice {d})" for d in sorted(disks, key=int)
            )
            raise DiskNotFound(f"VM {vm_name!r} has no disk {disk!r} (it has: {have or 'none'})")
        return disks[slot]

    def _wait(self, task: str, what: str) -> str:
        """Poll an Async call's task; its result is XML like ``<value>OpaqueRef:…</value>``."""
        delay = TASK_POLL_S
        try:
            # "cancelling" is a task state too (datamodel: pending, success, failure,
            # cancelling, cancelled): the task has not ended yet.
            while (status := self._api("task.get_status", task)) in ("pending", "cancelling"):
                time.sleep(delay)
                delay = min(delay * 2, TASK_POLL_MAX_S)
            if status != "success":
                info = self._api("task.get_error_info", task)
                raise _failure_error(XenAPI.Failure(info), what)
            result = self._api("task.get_result", task)
        finally:
            self._api("task.destroy", task)
        match = re.search(r"<value>(.*?)</value>", result or "")
        return match.group(1) if match else str(result)

    def _snapshot_vdis(self, vdi: str) -> dict[str, str]:
        """Our volume snapshots of one VDI: label ``snapferry-<uuid>`` -> ref. A snapshot
        whose take stopped before it was labelled is found by the ``TAKE_KEY`` it
        inherited from its VDI's other_config (``xapi_vdi.ml`` ``snapshot_and_clone``
        copies it), and labelled now."""
        found = {}
        for snap in self._api("VDI.get_snapshots", vdi):
            label = self._api("VDI.get_name_label", snap)
            if not _VOLUME_LABEL.fullmatch(label):
                taken = self._api("VDI.get_other_config", snap).get(TAKE_KEY, "")
                if not _UUID.fullmatch(taken) or VOLUME_PREFIX + taken in found:
                    continue
                label = VOLUME_PREFIX + taken
                self._api("VDI.set_name_label", snap, label)
            found[label] = snap
        return found

    def _power(self, vm: str) -> str:
        return str(self._api("VM.get_power_state", vm))

    # -- take --------------------------------------------------------------------------------
    def take(self, *, volume: VolumeRef, snapshot_id: str) -> PrimarySnapshot:
        vm_name = volume.vm.name
        vm = self._vm(vm_name)
        with _vm_locks[vm]:
            vdi = self._vdi(vm, vm_name, volume.disk)
            label = VOLUME_PREFIX + snapshot_id
            snap = self._snapshot_vdis(vdi).get(label)  # a retry finds it
            if snap is None:
                # Mark the source first: the snapshot inherits its other_config at the
                # instant it is made, so a take that stops before the label is set still
                # finds its snapshot on the retry (see _snapshot_vdis).
                self._api("VDI.remove_from_other_config", vdi, TAKE_KEY)
                self._api("VDI.add_to_other_config", vdi, TAKE_KEY, snapshot_id)
                try:
                    task = self._api("Async.VDI.snapshot", vdi, {})
                    snap = self._wait(task, f"snapshot of {vm_name}/{volume.disk}")
                finally:
                    with contextlib.suppress(HypervisorUnavailable, SourceGone):
                        self._api("VDI.remove_from_other_config", vdi, TAKE_KEY)
                self._api("VDI.set_name_label", snap, label)
            size = int(self._api("VDI.get_virtual_size", snap))
            return PrimarySnapshot(
                image=str(self._api("VDI.get_uuid", snap)),
                image_format="vhd",
                overlay=None,
                virtual_size=size,
                vm_was_running=self._power(vm) == "Running",
            )

    # -- backup --------------------------------------------------------------------------------
    def _exists(self, vdi_uuid: str) -> bool:
        try:
            self._api("VDI.get_by_uuid", vdi_uuid)
        except SourceGone:
            return False
        return True

    def plan_backup(
        self, source: PrimarySnapshot, backups: list[Manifest], *, delta_max: int | None = None
    ) -> BackupPlan:
        """A delta on the newest backup while its VDI is on primary and the chain is short
        enough (``snapshot.delta.max``), else a full, saying why."""
        if not backups:
            return BackupPlan(reason="the volume's first backup")
        newest = backups[-1]
        limit = self.delta_max if delta_max is None else delta_max
        if newest.depth + 1 > limit:
            return BackupPlan(
                reason=f"{newest.depth} deltas since the last full (delta max {limit})"
            )
        if not self._exists(newest.source):
            return BackupPlan(
                reason=f"the base snapshot {newest.snapshot_id}'s VDI is no longer on primary"
            )
        return BackupPlan(
            parent=newest.snapshot_id, base_image=newest.source, depth=newest.depth + 1
        )

    def open_reader(self, source: PrimarySnapshot, plan: BackupPlan) -> VhdExportReader:
        return VhdExportReader(self.session, source.image, plan.base_image)

    # -- release / discard -----------------------------------------------------------------
    def release(
        self,
        *,
        volume: VolumeRef,
        snapshot_id: str,
        source: PrimarySnapshot,
        backed_up: bool = True,
    ) -> None:
        """Keep this (the newest backed-up) snapshot as the next delta base; destroy every
        other snapshot of the volume that was released before. A snapshot deleted without
        a backup can be no one's base: only its own VDI goes, and the base stays."""
        vm_name = volume.vm.name
        vm = self._vm(vm_name)
        with _vm_locks[vm]:
            vdi = self._vdi(vm, vm_name, volume.disk)
            ours = self._snapshot_vdis(vdi)
            label = VOLUME_PREFIX + snapshot_id
            if not backed_up:
                if label in ours:
                    self._api("VDI.destroy", ours[label])
                return
            if label in ours:
                self._api("VDI.set_name_description", ours[label], RELEASED)
            for other, ref in ours.items():
                if other == label:
                    continue
                if self._api("VDI.get_name_description", ref) == RELEASED:
                    self._api("VDI.destroy", ref)

    def discard(self, req: DiscardRequest) -> None:
        vm = self._vm(req.vm.name)
        with _vm_locks[vm]:
            for vdi in self._vdis(vm).values():
                snap = self._snapshot_vdis(vdi).get(VOLUME_PREFIX + req.snapshot_id)
                if snap is not None:
                    self._api("VDI.destroy", snap)
            self._destroy_vm_snapshot(vm, req.snapshot_id)

    # -- restore ---------------------------------------------------------------------------
    def _import(self, vdi: str, raw: Path) -> None:
        """``PUT /import_raw_vdi`` of a raw image, then read back and compare (SHA-256)."""
        uuid = str(self._api("VDI.get_uuid", vdi))
        endpoint = self._data_host(uuid)
        status, body, sent = endpoint.put_file(
            self.session.url("import_raw_vdi", vdi=uuid, format="raw"), raw, {}
        )
        if status == 409:
            raise ChainBusy(f"VDI {uuid} is in use: {body!r}")
        if status not in (200, 201, 204):
            raise HypervisorUnavailable(f"import into VDI {uuid}: HTTP {status}")
        status, back = endpoint.get_sha256(
            self.session.url("export_raw_vdi", vdi=uuid, format="raw"), {}
        )
        if status != 200 or back != sent:
            raise ChainBusy(f"VDI {uuid} did not read back as written (HTTP {status})")

    def _data_host(self, uuid: str) -> Endpoint:
        """Where a VDI's data is served: the master, or the host its 302 names (a VDI on a
        member's local SR; ``import_raw_vdi.ml`` and ``export_raw_vdi.ml`` both redirect).
        Found by starting a raw export and closing it before any byte of the body: a PUT
        cannot follow a 302 once its body is on the way."""
        endpoint = self.session.endpoint
        for _ in range(VhdExportReader.MAX_REDIRECTS):
            conn = endpoint.connection()
            try:
                conn.request("GET", self.session.url("export_raw_vdi", vdi=uuid, format="raw"))
                resp = conn.getresponse()
                location = resp.getheader("Location") or ""
                status = resp.status
            except (OSError, http.client.HTTPException) as exc:
                raise HypervisorUnavailable(f"VDI {uuid}: XenServer unreachable: {exc}") from exc
            finally:
                conn.close()  # the body (a whole disk) is never read
            if status not in (301, 302, 303, 307):
                return endpoint
            endpoint = _redirect_target(self.session, location, uuid)[0]
        raise HypervisorUnavailable(f"VDI {uuid}: too many redirects")

    def revert(self, req: RevertRequest) -> None:
        """Rebuild full + deltas and import them into the halted VM's VDI."""
        from ..storage.secondary import SecondaryStore

        vm_name, disk = req.volume.vm.name, req.volume.disk
        if req.manifest_path is None:
            raise InvalidInput(
                f"snapshot {req.snapshot_id} is not backed up yet; on XenServer a volume is"
                " reverted from its backup chain"
            )
        manifest = SecondaryStore.read_manifest(Path(req.manifest_path))
        vm = self._vm(vm_name)
        with _vm_locks[vm], SecondaryStore.materialized(manifest) as raw:
            if self._power(vm) != "Halted":
                raise InvalidInput(f"VM {vm_name!r} is running; stop it before reverting {disk!r}")
            self._import(self._vdi(vm, vm_name, disk), raw)

    def create_volume(self, req: RestoreRequest, raw_backup: str) -> RestoreResult:
        """A new VDI on the source VDI's SR, named after the volume, filled by import."""
        vm_name = req.volume.vm.name
        vm = self._vm(vm_name)
        source = self._vdi(vm, vm_name, req.volume.disk)
        sr = self._api("VDI.get_SR", source)
        size = os.path.getsize(raw_backup)
        existing = self._api("VDI.get_by_name_label", req.name)
        if existing:
            raise InvalidInput(f"volume {req.name!r} already exists on XenServer")
        record = {
            "name_label": req.name,
            "name_description": f"snapferry: from snapshot {req.snapshot_id}",
            "SR": sr,
            "virtual_size": str(size),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
        vdi = self._api("VDI.create", record)
        try:
            self._import(vdi, Path(raw_backup))
        except BaseException:
            self._api("VDI.destroy", vdi)
            raise
        uuid = self._api("VDI.get_uuid", vdi)
        return RestoreResult(path=f"xapi:VDI/{uuid}", virtual_size=size, format="vdi")

    # -- VM snapshots --------------------------------------------------------------------------
    def _vm_snapshot(self, vm: str | None, snapshot_id: str) -> str | None:
        """Our snapshot VM ``snapferry-vm-<id>`` (of ``vm`` when given): only a VM snapshot,
        never a VM or template that happens to carry the label."""
        label = VM_PREFIX + snapshot_id
        found = []
        for ref in self._api("VM.get_by_name_label", label):
            rec = self._api("VM.get_record", ref)
            if rec.get("is_a_snapshot") and vm in (None, rec.get("snapshot_of")):
                found.append(str(ref))
        if len(found) > 1:
            raise InvalidInput(f"{len(found)} VM snapshots are labelled {label!r}: {found}")
        return found[0] if found else None

    def take_vm_snapshot(self, op: VmSnapshotOperation) -> VmSnapshotTaken:
        vm_name = op.vm.name
        vm = self._vm(vm_name)
        with _vm_locks[vm]:
            running = self._power(vm) == "Running"
            memory = op.type == VmSnapshotType.DISK_AND_MEMORY
            if memory and not running:
                raise InvalidInput(
                    f"VM {vm_name!r} is stopped: a DiskAndMemory snapshot needs a running VM"
                    " (take a Disk snapshot instead)"
                )
            label = VM_PREFIX + op.snapshot_id
            if self._vm_snapshot(vm, op.snapshot_id) is None:
                if memory:
                    self._api("VM.checkpoint", vm, label)
                else:
                    self._api("VM.snapshot", vm, label)
            return VmSnapshotTaken(overlays={}, memory=None, vm_was_running=running)

    def revert_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        vm_name = op.vm.name
        vm = self._vm(vm_name)
        with _vm_locks[vm]:
            snap = self._vm_snapshot(vm, op.snapshot_id)
            if snap is None:
                raise SourceGone(f"VM snapshot {op.snapshot_id} is gone from {vm_name!r}")
            if op.type == VmSnapshotType.DISK and self._power(vm) != "Halted":
                raise InvalidInput(
                    f"VM {vm_name!r} is running; stop it before reverting to Disk snapshot"
                    f" {op.snapshot_id}"
                )
            if op.type == VmSnapshotType.DISK_AND_MEMORY and self._power(vm) == "Running":
                # VM.revert destroys the VM's VBDs, which fails while they are attached;
                # XAPI then force-resets the VM to Halted and raises VM_REVERT_FAILED
                # (xapi_vm_snapshot.ml, revert). The checkpoint replaces the VM's memory
                # anyway, so stop it first, as the KVM and VMware drivers do.
                self._api("VM.hard_shutdown", vm)
            self._api("VM.revert", snap)
            # XAPI leaves a VM reverted to a checkpoint Suspended (its memory restored):
            # resume it, so that it ends running as on the other hypervisors.
            state = self._power(vm)
            if op.type == VmSnapshotType.DISK_AND_MEMORY and state == "Suspended":
                self._api("VM.resume", vm, False, False)
            elif op.type == VmSnapshotType.DISK_AND_MEMORY and state == "Halted":
                self._api("VM.start", vm, False, False)

    def delete_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        """By the snapshot's own label: it is deleted even when its VM is gone or renamed."""
        snap = self._vm_snapshot(None, op.snapshot_id)
        if snap is None:
            return
        with _vm_locks[str(self._api("VM.get_snapshot_of", snap))]:
            self._destroy_vm_snapshot(None, op.snapshot_id)

    def _destroy_vm_snapshot(self, vm: str | None, snapshot_id: str) -> None:
        """The snapshot VM, the snapshot VDIs its VBDs hold and its memory image."""
        snap = self._vm_snapshot(vm, snapshot_id)
        if snap is None:
            return
        vdis = list(self._vdis(snap).values())
        # A checkpoint's memory image (RAM-sized) is its suspend_VDI; VM.destroy leaves it,
        # as it leaves every VDI (CloudStack's CitrixDeleteVMSnapshotCommandWrapper too
        # destroys it).
        memory = self._api("VM.get_suspend_VDI", snap)
        if memory and memory != NULL_REF:
            vdis.append(memory)
        self._api("VM.destroy", snap)
        for vdi in vdis:
            self._api("VDI.destroy", vdi)
