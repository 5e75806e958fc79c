"""Restores from secondary: a volume reverted in place, and a new volume uploaded."""

from __future__ import annotations

import http.client
import tempfile
from pathlib import Path

from ...contracts import RestoreRequest, RestoreResult, RevertRequest
from ...errors import ChainBusy, HypervisorUnavailable, InvalidInput, SourceGone
from .cbt import CbtOps
from .common import flat_path, vm_lock
from .session import file_access_denied


class RestoreOps(CbtOps):
    """Reverts and new volumes, written over the datastore file protocol."""

    # -- revert a volume (from secondary) ----------------------------------------------------
    def revert(self, req: RevertRequest) -> None:
        """Write the verified backup over the powered-off VM's disk, then read it back.

        Refused while the VM has vSphere snapshots: their redo logs are based on that disk,
        so rewriting it underneath them would corrupt every one of them. Refused too while
        the disk is still on a redo log that no snapshot holds (a removal that could not
        consolidate, ``runtime.consolidationNeeded``), unless a consolidation now brings it
        back to its base: the VM reads through the redo log, so a backup written to the
        base would not be what it reads, and one written to the log's name would be a new
        file it never reads. The checks come before the backup is read, so a refusal
        costs nothing and changes nothing.

        The write goes past the VM, so Changed Block Tracking does not see it: CBT is reset
        first (off, then on), so that the next backup is a full rather than a delta that
        would miss the reverted areas."""
        from ...storage.backup_image import backup_image

        vm_name, disk = req.volume.vm.name, req.volume.disk
        if req.manifest_path is None:
            raise InvalidInput(
                f"snapshot {req.snapshot_id} is not backed up yet; on VMware a volume is"
                " reverted from its backup"
            )
        with vm_lock(vm_name):
            vm = self._vm(vm_name)
            if self._powered_on(vm):
                raise InvalidInput(f"VM {vm_name!r} is running; stop it before reverting {disk!r}")
            held = [n.name for n in self._snapshots(vm)]
            if held:
                raise InvalidInput(
                    f"VM {vm_name!r} has vSphere snapshots {held}: rewriting {disk!r} under"
                    " them would corrupt them; revert to or delete them first"
                )
            device = self._disk(vm, vm_name, disk)
            if getattr(device.backing, "parent", None) is not None or self._needs_consolidation(vm):
                self._settle_consolidation(vm, vm_name, f"reverting {disk!r}")
                device = self._disk(vm, vm_name, disk)
            if getattr(device.backing, "parent", None) is not None:
                raise InvalidInput(
                    f"disk {disk!r} of VM {vm_name!r} is still on the redo log"
                    f" {device.backing.fileName} (over {device.backing.parent.fileName}) and"
                    " its consolidation failed: consolidate the VM's disks in vCenter"
                    " (Snapshots > Consolidate), then revert again; nothing was written"
                )
            ds, path = flat_path(device.backing.fileName)
            tracked = self.session.call(
                lambda _si: bool(vm.config.changeTrackingEnabled), "reading changeTrackingEnabled"
            )
            if tracked:
                self._stop_tracking(vm, f"VM {vm_name!r} (reverting {disk!r})")
            with backup_image(req.manifest_path) as raw:
                sent = self._upload(ds, path, raw)
            if self._download_digest(ds, path) != sent:
                raise ChainBusy(f"{disk!r} on {vm_name!r} did not read back as written")

    # -- a new volume from a backup ----------------------------------------------------------
    def create_volume(self, req: RestoreRequest, raw_backup: str) -> RestoreResult:
        """Upload the backup as a new flat disk (``<name>-flat.vmdk`` plus its descriptor)
        in the source VM's datastore folder, read it back, and only then write the
        descriptor that makes it a disk: a half-uploaded volume is never attachable."""
        vm_name = req.volume.vm.name
        ds = req.primary_dir.partition("] ")[0].lstrip("[")
        flat = f"{vm_name}/{req.name}-flat.vmdk"
        descriptor = f"{vm_name}/{req.name}.vmdk"
        if self._exists(ds, descriptor) or self._exists(ds, flat):
            raise InvalidInput(f"volume {req.name!r} already exists at [{ds}] {descriptor}")
        size = Path(raw_backup).stat().st_size
        sent = self._upload(ds, flat, Path(raw_backup))
        if self._download_digest(ds, flat) != sent:
            raise ChainBusy(f"[{ds}] {flat} did not read back as written")
        text = (
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
            'createType="vmfs"\n\n# Extent description\n'
            f'RW {size // 512} VMFS "{req.name}-flat.vmdk"\n'
        )
        self._upload_bytes(ds, descriptor, text.encode())
        return RestoreResult(path=f"[{ds}] {descriptor}", virtual_size=size, format="vmdk")

    def _exists(self, ds: str, path: str) -> bool:
        def head(cookie: str) -> int:
            conn = self.session.connection()
            try:
                conn.request("HEAD", self.session.file_url(ds, path), None, {"Cookie": cookie})
                resp = conn.getresponse()
                resp.read()
                return resp.status
            except (OSError, http.client.HTTPException) as exc:
                raise HypervisorUnavailable(
                    f"datastore HEAD of [{ds}] {path} failed: {exc}"
                ) from exc
            finally:
                conn.close()

        status = self.session.transfer(head, lambda status: status)
        if status == 403:
            raise file_access_denied("HEAD", ds, path)
        return bool(status == 200)

    def _upload_bytes(self, ds: str, path: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile() as tmp:
            tmp.write(data)
            tmp.flush()
            self._upload(ds, path, Path(tmp.name))

    def _upload(self, ds: str, path: str, source: Path) -> str:
        """PUT ``source``; with a session checked alive just before (a 401 would come only
        after the whole body), and sent again after a new login if it still meets one. A
        HEAD goes first, so that a login without the datastore's file privileges hears
        so (403, ``file_access_denied``) before the body, which a server refusing it may
        stop reading."""
        url = self.session.file_url(ds, path)
        self._exists(ds, path)
        cookie = self.session.live_cookie()
        status, body, sent = self.session.endpoint.put_file(url, source, {"Cookie": cookie})
        if status == 401:
            self.session.renew(cookie)
            status, body, sent = self.session.endpoint.put_file(
                url, source, {"Cookie": self.session.cookie()}
            )
        if status == 403:
            raise file_access_denied("PUT", ds, path)
        if status not in (200, 201, 204):
            raise HypervisorUnavailable(
                f"datastore PUT of [{ds}] {path} answered {status}: {body!r}"
            )
        return sent

    def _download_digest(self, ds: str, path: str) -> str:
        url = self.session.file_url(ds, path)
        status, digest = self.session.transfer(
            lambda cookie: self.session.endpoint.get_sha256(url, {"Cookie": cookie}),
            lambda answer: int(answer[0]),
        )
        if status == 403:
            raise file_access_denied("GET", ds, path)
        if status != 200:
            raise SourceGone(f"[{ds}] {path}: datastore GET answered {status}")
        return str(digest)
