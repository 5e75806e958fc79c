"""Restores: a rebuilt raw image written into a VDI with ``PUT /import_raw_vdi``."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import XenAPI

from ...contracts import (
    RestoreRequest,
    RestoreResult,
    RevertRequest,
)
from ...errors import ChainBusy, HypervisorUnavailable, InvalidInput, SourceGone
from ..endpoint import Endpoint
from .common import (
    IO_CHUNK,
    RESTORE_BLOCK,
    RESTORE_BLOCKED_OPS,
    TASK_POLL_MAX_S,
    TASK_POLL_S,
    _failure_error,
    _vm_locks,
)
from .core import XenCore
from .export import VhdExportReader
from .session import XapiSession, _drop_task, _redirect_target
from .vhd_stream import BLOCK, SparseVhd

log = logging.getLogger(__name__)
IMPORT_TASK_WAIT_S = 300.0  # for the import's task to end once its body is sent


class RestoreOps(XenCore):
    """``PUT /import_raw_vdi`` as XAPI serves it (``import_raw_vdi.ml``): ``200 OK`` comes
    before the body is read and before the VDI is attached, so the status says nothing; a
    later failure fails the request's task (``task_id=``, adopted and completed or failed
    by XAPI) and cuts the connection after a 500 page in the body. The task decides."""

    def _import(
        self, vdi: str, raw: Path, *, sparse: bool = False, also: Iterable[int] = ()
    ) -> None:
        """Write ``raw`` from offset 0 and zeros up to the VDI's size (a disk that grew
        since the backup, or one the SR rounded up, reads as the backup then zeros), then
        read the whole VDI back and compare SHA-256. ``sparse``: as a VHD of the backup's
        data blocks only (``format=vhd``), on an SR whose VDIs XAPI takes as pre-zeroed
        (``_prezeroed``), with zeros in the blocks ``also`` names (where the VDI holds data
        the backup does not have): a raw import writes every byte, and on a thin SR
        allocates every block."""
        uuid = str(self._api("VDI.get_uuid", vdi))
        size = int(self._api("VDI.get_virtual_size", vdi))
        length = raw.stat().st_size
        if length > size:
            raise InvalidInput(
                f"the backup ({length} bytes) is larger than VDI {uuid} ({size} bytes)"
            )
        endpoint = self._data_host(vdi)
        sent = ""
        fmt = "vhd" if sparse else "raw"
        for attempt in range(2):
            task = str(self._api("task.create", "snapferry import", f"import into VDI {uuid}"))
            since = self.session.generation
            try:
                url = self.session.url("import_raw_vdi", vdi=uuid, format=fmt, task_id=task)
                body = SparseVhd(raw, size, also) if sparse else _RawBody(raw, size)
                status, location, sent = _put(endpoint, url, body)
                if status == 401 and attempt == 0:  # XenAPI re-logs in for XML-RPC only
                    self.session.relogin()
                    continue
                if status in (301, 302, 303, 307) and attempt == 0:
                    endpoint = _redirect_target(self.session, location, uuid)[0]
                    continue
                self._import_outcome(task, uuid, status, since)
                break
            finally:
                _drop_task(self.session, task)
        status, back = endpoint.get_sha256(
            self.session.url("export_raw_vdi", vdi=uuid, format="raw"), {}
        )
        if status != 200 or back != sent:
            raise ChainBusy(f"VDI {uuid} did not read back as written (HTTP {status})")

    def _prezeroed(self, vdi: str) -> bool:
        """Whether XAPI takes a new VDI as full of zeros, so that a ``format=vhd`` import
        into it may write only its blocks: not on a legacy LVM SR (lvm, lvmoiscsi, lvmohba
        without ``sm_config`` ``use_vhd=true``) nor for a raw VDI asked of one, nor on an
        EqualLogic SR in thick mode or a StorageLink SR (``Sm_fs_ops.
        must_write_zeroes_into_new_vdi``); vhd-tool refuses a VHD import there
        (``serve_vhd_to_raw``: "unimplemented: prezeroed")."""
        sr = self._api("VDI.get_SR", vdi)
        sr_type = str(self._api("SR.get_type", sr)).lower()
        sr_config = {
            str(k).lower(): str(v).lower()
            for k, v in (self._api("SR.get_sm_config", sr) or {}).items()
        }
        vdi_config = self._api("VDI.get_sm_config", vdi) or {}
        if sr_type in ("lvm", "lvmoiscsi", "lvmohba") and (
            vdi_config.get("type") == "raw" or sr_config.get("use_vhd") != "true"
        ):
            return False
        if sr_type == "equal" and sr_config.get("allocation") == "thick":
            return False
        return sr_type != "cslg"

    def _import_outcome(self, task: str, uuid: str, status: int | None, since: int) -> None:
        """The import's task, once it has ended: success, or its error as ours (a task
        lost to a master change: ``TaskLost``, retryable; the revert is written again)."""
        from ...storage.liveness import alive

        what = f"import into VDI {uuid}"
        deadline = time.monotonic() + IMPORT_TASK_WAIT_S
        delay = TASK_POLL_S
        while (state := self._task_api("task.get_status", task, since)) in (
            "pending",
            "cancelling",
        ):
            if time.monotonic() > deadline:
                raise HypervisorUnavailable(f"{what}: its task is still {state}")
            alive()
            time.sleep(delay)
            delay = min(delay * 2, TASK_POLL_MAX_S)
        if state == "success":
            if status not in (None, 200):
                raise HypervisorUnavailable(f"{what}: HTTP {status}")
            return
        info = self._task_api("task.get_error_info", task, since) or ["UNKNOWN"]
        raise _failure_error(XenAPI.Failure(info), what)

    def _data_host(self, vdi: str) -> Endpoint:
        """Where XAPI serves a VDI's data, by its own rule (``Importexport.find_host_for_sr``
        via ``check_sr_availability``): any host of a shared SR, so the master we talk to;
        else the host with the SR's attached PBD, at its ``Host.address``. Nothing is
        probed: an export started and dropped would hold the VDI RO in dom0 for a while,
        and the import's RW attach would meet ``Illegal_transition``."""
        sr = self._api("VDI.get_SR", vdi)
        if self._api("SR.get_shared", sr):
            return self.session.endpoint
        master = self._api("pool.get_master", self._api("pool.get_all")[0])
        for pbd in self._api("SR.get_PBDs", sr):
            if not self._api("PBD.get_currently_attached", pbd):
                continue
            host = self._api("PBD.get_host", pbd)
            if host == master:
                return self.session.endpoint  # the address we already reach it by
            return _host_endpoint(self.session, str(self._api("host.get_address", host)))
        raise HypervisorUnavailable(
            f"SR {self._api('SR.get_uuid', sr)} is plugged into no host (no attached PBD)"
        )

    def revert(self, req: RevertRequest) -> None:
        """Rebuild full + deltas and import them into the halted VM's VDI."""
        from ...storage.backup_image import backup_image

        vm_name, disk = req.volume.vm.name, req.volume.disk
        if req.manifest_path is None:
            raise InvalidInput(
                f"snapshot {req.snapshot_id} is not backed up yet; on XenServer a volume is"
                " reverted from its backup chain"
            )
        vm = self._vm(vm_name)
        what = f"{disk} from snapshot {req.snapshot_id}"
        with (
            _vm_locks[vm],
            backup_image(req.manifest_path) as raw,
            self._start_blocked(vm, what),
        ):
            # checked once the block holds: a start just before it is seen here
            if self._power(vm) != "Halted":
                raise InvalidInput(f"VM {vm_name!r} is running; stop it before reverting {disk!r}")
            vdi = self._vdi(vm, vm_name, disk)
            image_format = self._image_format(str(self._api("VDI.get_uuid", vdi)))
            if image_format == "vhd" and self._prezeroed(vdi):
                self._import(vdi, raw, sparse=True, also=self._held_blocks(vdi))
            else:
                why = (
                    f"the VDI is {image_format}, not VHD"
                    if image_format != "vhd"
                    else "XAPI imports a VHD only into a VDI its SR takes as pre-zeroed"
                )
                log.warning(
                    "revert of %s/%s: written whole (raw; a thin disk becomes fully allocated): %s",
                    vm_name,
                    disk,
                    why,
                )
                self._import(vdi, raw)

    def _held_blocks(self, vdi: str) -> set[int]:
        """The 2 MiB blocks the VDI holds data in: those its full VHD export carries
        (allocated anywhere in its chain; a block nobody wrote reads as zeros). A revert
        writes the backup's blocks and zeros into these, nothing else: vhd-tool writes
        only the blocks a VHD carries (``serve_vhd_to_raw``), so a block left out keeps
        what it held. The export is read to its end, the cost of a thin revert: the data
        the disk holds is read once more."""
        reader = VhdExportReader(self.session, str(self._api("VDI.get_uuid", vdi)), None)
        try:
            held = reader.blocks(BLOCK)
            reader.read_to_end()
        finally:
            reader.close()
        return held

    @contextlib.contextmanager
    def _start_blocked(self, vm: str, what: str) -> Iterator[None]:
        """The VM cannot start or resume while the restore writes its disk: XAPI lets it
        (VBD.plug's sharing check exempts dom0's own VBD, xapi_vbd_helpers.ml), so
        ``start``, ``start_on``, ``resume`` and ``resume_on`` go into
        ``VM.blocked_operations``, refused there before anything else
        (xapi_vm_lifecycle.ml ``check_operation_error``). An entry already there is the
        operator's (or an earlier attempt's, by its value) and is left as it is; only
        entries whose value is ours are taken out, on success and on failure. When
        taking them out fails, the restore fails (retryable): its retry finds them and
        takes them out."""
        blocked = self._api("VM.get_blocked_operations", vm)
        value = (
            f"{RESTORE_BLOCK} ({what}); if no snapferry restore of this VM runs, remove"
            " this entry (xe vm-param-remove param-name=blocked-operations param-key=<op>)"
        )
        try:
            for op in RESTORE_BLOCKED_OPS:
                if op not in blocked:
                    self._api("VM.add_to_blocked_operations", vm, op, value)
            yield
        except BaseException:
            with contextlib.suppress(HypervisorUnavailable, SourceGone):
                self._unblock(vm)
            raise
        self._unblock(vm)

    def _unblock(self, vm: str) -> None:
        for op, value in self._api("VM.get_blocked_operations", vm).items():
            if op in RESTORE_BLOCKED_OPS and str(value).startswith(RESTORE_BLOCK):
                self._api("VM.remove_from_blocked_operations", vm, op)

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
            # A new VDI is zeros: only the backup's data blocks need writing, where XAPI
            # agrees that it is (else every byte, and a thin SR allocates them all).
            self._import(vdi, Path(raw_backup), sparse=self._prezeroed(vdi))
        except BaseException:
            self._run("VDI.destroy", vdi, cancellable=False)
            raise
        uuid = self._api("VDI.get_uuid", vdi)
        # SM rounds a VHD VDI up to whole 2 MiB blocks (vhdutil.validate_and_round_vhd_size):
        # the volume is that large, its tail beyond the backup zeros (written by _import).
        made = int(self._api("VDI.get_virtual_size", vdi))
        return RestoreResult(path=f"xapi:VDI/{uuid}", virtual_size=made, format="vdi")


def _host_endpoint(session: XapiSession, address: str) -> Endpoint:
    """A pool host at its ``Host.address``, reached as XAPI's own 302 would send us
    (``Importexport.return_302_redirect``: the master's scheme, the address, no port);
    or, when the address cannot be reached from here and that host answered us at
    another URL, there (``XapiSession.reachable``)."""
    scheme = session.endpoint.scheme
    host, port = address, 443 if scheme == "https" else 80
    if address.startswith("["):  # [IPv6]:port
        host, _, rest = address[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else port
    elif address.count(":") == 1:  # name or IPv4 with a port
        host, _, number = address.partition(":")
        port = int(number)
    return session.reachable(Endpoint(scheme, host, port, session.endpoint.verify_tls), address)


class _RawBody:
    """The raw file, then zeros up to ``size``: what a raw import writes."""

    def __init__(self, raw: Path, size: int) -> None:
        self.raw, self.length = raw, size
        self._digest = hashlib.sha256()

    def chunks(self) -> Iterator[bytes]:
        left = self.length
        with open(self.raw, "rb") as f:
            while left > 0:
                block = f.read(min(IO_CHUNK, left)) or bytes(min(IO_CHUNK, left))
                self._digest.update(block)
                yield block
                left -= len(block)

    def content_sha256(self) -> str:
        return self._digest.hexdigest()


def _put(endpoint: Endpoint, url: str, body: _RawBody | SparseVhd) -> tuple[int | None, str, str]:
    """``PUT`` the body (status or None when no answer came, Location, SHA-256 of the disk
    the body describes, or of nothing when it was cut short). XAPI may cut the connection
    while the body is on its way (a failed attach): that is no error here; the task says
    what happened."""
    from ...storage.liveness import alive

    conn = endpoint.connection()
    try:
        conn.putrequest("PUT", url)
        conn.putheader("Content-Length", str(body.length))
        conn.putheader("Content-Type", "application/octet-stream")
        conn.endheaders()
        left = body.length
        with contextlib.suppress(OSError):
            for chunk in body.chunks():
                for at in range(0, len(chunk), IO_CHUNK):
                    conn.send(chunk[at : at + IO_CHUNK])
                left -= len(chunk)
                alive()
        # cut short: what was sent is not the image
        sent = body.content_sha256() if left == 0 else "incomplete"
        try:
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            return None, "", sent
        with contextlib.suppress(OSError, http.client.HTTPException):
            resp.read(4096)  # a 500 page, if any: the task has the error itself
        return resp.status, resp.getheader("Location") or "", sent
    except (OSError, http.client.HTTPException) as exc:
        raise HypervisorUnavailable(f"PUT {url.split('?')[0]} failed: {exc}") from exc
    finally:
        conn.close()
