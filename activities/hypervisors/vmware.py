"""VMware through pyvmomi: a full clone per volume snapshot, exported over datastore HTTP.

Take (the spec's rule: "a full clone, as a thin clone would affect the VM until the backup is
done"): a vSphere snapshot of the VM without memory or quiesce, a *full* clone of the VM
from that snapshot (``moveAllDiskBackingsAndDisallowSharing``), then the vSphere snapshot is
removed. The clone's disks are the snapshot's primary copy; the source VM keeps running on
its own disks and carries no snapshot of ours, so it is free while the backup runs.

Backup: the clone's flat disk of the requested volume is streamed into the copy engine with
HTTP ``Range`` requests on ``/folder/<path>?dcPath=..&dsName=..`` (the datastore file
protocol), so a resumed backup asks only for the bytes after its checkpoint. Release
destroys the clone: one clone per snapshot, tracked by its record, named after it.

VM snapshots are vSphere snapshots named ``snapferry-vm-<id>``; they live in the VM's own
snapshot tree, where a volume snapshot's temporary vSphere snapshot comes and goes without
touching them. Every object is found by name each time, so no stored reference goes stale.

Credentials: ``SNAPFERRY_VCENTER_*`` (see settings); the password is read at login from a
file or the environment and never leaves this process.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

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
    VmNotFound,
)
from ..settings import Settings, VcenterConfig
from ..storage.reader import DataExtent
from .base import HypervisorDriver
from .endpoint import Endpoint

CLONE_TAG = "-snapferry-"
VOLUME_SNAPSHOT_PREFIX = "snapferry-"
VM_SNAPSHOT_PREFIX = "snapferry-vm-"
TASK_POLL_S = 0.05
UPLOAD_CHUNK = 8 * 1024 * 1024

_vm_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


def clone_name(vm: str, snapshot_id: str) -> str:
    return f"{vm}{CLONE_TAG}{snapshot_id}"


def flat_path(backing_file: str) -> tuple[str, str]:
    """``[ds1] dir/disk.vmdk`` -> (``ds1``, ``dir/disk-flat.vmdk``): the raw extent of a flat
    disk, which is what the datastore serves byte for byte."""
    ds, _, path = backing_file.partition("] ")
    return ds.lstrip("["), path.removesuffix(".vmdk") + "-flat.vmdk"


def _disk_name(device: Any) -> str:
    """A disk's snapferry name: its file's stem (``web01``, ``web01_1``), which is unique per
    VM and a safe name, unlike its label ("Hard disk 1")."""
    return Path(device.backing.fileName.partition("] ")[2]).name.removesuffix(".vmdk")


def _fault_error(fault: Any, what: str) -> Exception:
    """A vSphere fault as our typed error: missing files are permanent, the rest transient."""
    message = getattr(fault, "msg", None) or type(fault).__name__
    if isinstance(fault, vim.fault.InvalidLogin):
        return CredentialsRejected(f"vCenter rejected the credentials: {message}")
    if isinstance(fault, vim.fault.FileNotFound | vim.fault.NotFound):
        return SourceGone(f"{what}: {type(fault).__name__}: {message}")
    if isinstance(fault, vim.fault.InvalidPowerState):
        return InvalidInput(f"{what}: the VM is in the wrong power state ({message})")
    if isinstance(fault, vmodl.fault.ManagedObjectNotFound):
        return SourceGone(f"{what}: the object is gone ({message})")
    return HypervisorUnavailable(f"{what}: {type(fault).__name__}: {message}")


class VsphereSession:
    """One logged-in pyvmomi connection per process, re-established when it drops."""

    def __init__(self, config: VcenterConfig) -> None:
        self.config = config
        self.endpoint = Endpoint.from_url(config.url, verify_tls=config.verify_tls)
        self._si: Any = None
        self._lock = threading.Lock()

    def service(self, *, fresh: bool = False) -> Any:
        with self._lock:
            if self._si is None or fresh:
                try:
                    self._si = SmartConnect(
                        protocol=self.endpoint.scheme,
                        host=self.endpoint.host,
                        port=self.endpoint.port,
                        user=self.config.user,
                        pwd=self.config.password(),
                        disableSslCertValidation=not self.config.verify_tls,
                    )
                except vim.fault.InvalidLogin as exc:
                    raise CredentialsRejected(
                        f"vCenter {self.config.url} rejected user {self.config.user!r}"
                    ) from exc
                except OSError as exc:
                    raise HypervisorUnavailable(
                        f"cannot reach vCenter at {self.config.url}: {exc}"
                    ) from exc
            return self._si

    def call(self, fn: Callable[[Any], Any], what: str) -> Any:
        """Run ``fn(service_instance)``; log in again once if the session expired."""
        for attempt in (0, 1):
            si = self.service(fresh=attempt == 1)
            try:
                return fn(si)
            except vim.fault.NotAuthenticated:
                if attempt:
                    raise HypervisorUnavailable(f"{what}: vCenter session keeps expiring") from None
            except vmodl.MethodFault as fault:
                raise _fault_error(fault, what) from fault
            except OSError as exc:
                raise HypervisorUnavailable(f"{what}: vCenter unreachable: {exc}") from exc
        raise AssertionError("unreachable")

    def cookie(self) -> str:
        return str(self.service()._stub.cookie)

    def connection(self) -> http.client.HTTPConnection:
        return self.endpoint.connection()

    def file_url(self, ds: str, path: str) -> str:
        query = urllib.parse.urlencode({"dcPath": self.config.datacenter, "dsName": ds})
        return f"/folder/{urllib.parse.quote(path)}?{query}"

    def close(self) -> None:
        with self._lock:
            if self._si is not None:
                Disconnect(self._si)
                self._si = None


class DatastoreReader:
    """The copy engine's reader for one flat disk on a datastore: ranged HTTP GETs.

    The whole disk is one data extent (the datastore protocol says nothing about holes); the
    engine still writes all-zero chunks as holes, so the backup stays sparse."""

    def __init__(self, session: VsphereSession, ds: str, path: str, size: int) -> None:
        self.session, self.ds, self.path = session, ds, path
        self.virtual_size = size
        self._conn: http.client.HTTPConnection | None = None

    def data_extents(self) -> list[DataExtent]:
        return [DataExtent(start=0, length=self.virtual_size, path=self.path, host_offset=0)]

    def read_range(self, extent: DataExtent, guest_offset: int, view: memoryview) -> None:
        end = guest_offset + len(view) - 1
        headers = {"Cookie": self.session.cookie(), "Range": f"bytes={guest_offset}-{end}"}
        try:
            if self._conn is None:
                self._conn = self.session.connection()
            self._conn.request("GET", self.session.file_url(self.ds, self.path), None, headers)
            resp = self._conn.getresponse()
            if resp.status == 404:
                resp.read()
                raise SourceGone(f"[{self.ds}] {self.path} is gone from the datastore")
            if resp.status == 401:
                resp.read()
                self.session.service(fresh=True)
                raise HypervisorUnavailable("datastore session expired; logging in again")
            if resp.status != 206:
                resp.read()
                raise HypervisorUnavailable(f"datastore GET answered {resp.status} {resp.reason}")
            served = resp.getheader("Content-Range", "")
            if not served.startswith(f"bytes {guest_offset}-{end}/"):
                resp.read()
                raise HypervisorUnavailable(
                    f"datastore GET of {self.path} served {served!r},"
                    f" not bytes {guest_offset}-{end}"
                )
            got = resp.readinto(view)
            if got != len(view):
                raise HypervisorUnavailable(f"datastore GET returned {got} of {len(view)} bytes")
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise HypervisorUnavailable(f"datastore read of {self.path} failed: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class VmwareDriver(HypervisorDriver):
    def __init__(self, settings: Settings) -> None:
        if settings.vcenter is None:
            raise InvalidInput("VMware needs SNAPFERRY_VCENTER_URL (and user and password)")
        self.config = settings.vcenter
        self.session = VsphereSession(settings.vcenter)

    # -- lookups ---------------------------------------------------------------------------
    def _find_vm(self, name: str) -> Any:
        path = f"{self.config.datacenter}/vm/{name}"
        return self.session.call(
            lambda si: si.RetrieveContent().searchIndex.FindByInventoryPath(path),
            f"finding VM {name!r}",
        )

    def _vm(self, name: str) -> Any:
        vm = self._find_vm(name)
        if vm is None:
            raise VmNotFound(
                f"VM {name!r} does not exist in vCenter datacenter {self.config.datacenter!r}"
            )
        return vm

    def _disks(self, vm: Any) -> dict[str, Any]:
        devices = self.session.call(lambda _si: vm.config.hardware.device, "reading disks")
        return {_disk_name(d): d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)}

    def _disk(self, vm: Any, vm_name: str, disk: str) -> Any:
        disks = self._disks(vm)
        if disk not in disks:
            raise DiskNotFound(f"VM {vm_name!r} has no disk {disk!r} (it has {sorted(disks)})")
        return disks[disk]

    def _wait(self, task: Any, what: str) -> Any:
        """Poll the task's info (pyVim's WaitForTask needs property-collector filters)."""
        while True:
            info = self.session.call(lambda _si: task.info, what)
            if info.state == vim.TaskInfo.State.success:
                return info.result
            if info.state == vim.TaskInfo.State.error:
                raise _fault_error(info.error, what)
            time.sleep(TASK_POLL_S)

    def _run(self, start: Callable[[], Any], what: str) -> Any:
        return self._wait(self.session.call(lambda _si: start(), what), what)

    def _snapshots(self, vm: Any) -> Iterator[Any]:
        info = self.session.call(lambda _si: vm.snapshot, "reading snapshots")
        stack = list(info.rootSnapshotList) if info else []
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.childSnapshotList or [])

    def _snapshot_named(self, vm: Any, name: str) -> Any | None:
        return next((n.snapshot for n in self._snapshots(vm) if n.name == name), None)

    def _remove_snapshot(self, snap: Any, what: str) -> None:
        """Remove one vSphere snapshot; its children stay (re-parented), as do the disks."""
        self._run(lambda: snap.RemoveSnapshot_Task(removeChildren=False), what)

    def _powered_on(self, vm: Any) -> bool:
        state = self.session.call(lambda _si: vm.runtime.powerState, "reading power state")
        return bool(state == "poweredOn")

    def _destroy(self, vm: Any, what: str) -> None:
        if self._powered_on(vm):
            self._run(vm.PowerOffVM_Task, f"powering off {what}")
        self._run(vm.Destroy_Task, f"destroying {what}")

    # -- take --------------------------------------------------------------------------------
    def take(self, *, volume: VolumeRef, snapshot_id: str) -> PrimarySnapshot:
        vm_name, disk = volume.vm.name, volume.disk
        with _vm_locks[vm_name]:
            vm = self._vm(vm_name)
            source_disk = self._disk(vm, vm_name, disk)
            running = self._powered_on(vm)
            name = clone_name(vm_name, snapshot_id)
            snap_name = VOLUME_SNAPSHOT_PREFIX + snapshot_id
            clone = self._find_vm(name)  # a retried take finds its clone
            if clone is None:
                snap = self._snapshot_named(vm, snap_name) or self._run(
                    lambda: vm.CreateSnapshot_Task(
                        name=snap_name,
                        description=f"snapferry volume snapshot {snapshot_id} (temporary)",
                        memory=False,
                        quiesce=False,
                    ),
                    f"snapshotting VM {vm_name!r}",
                )
                spec = vim.vm.CloneSpec(
                    snapshot=snap,
                    location=vim.vm.RelocateSpec(
                        diskMoveType="moveAllDiskBackingsAndDisallowSharing"
                    ),
                    powerOn=False,
                    template=False,
                )
                parent = self.session.call(lambda _si: vm.parent, "reading the VM folder")
                clone = self._run(
                    lambda: vm.CloneVM_Task(folder=parent, name=name, spec=spec),
                    f"full clone of {vm_name!r} for snapshot {snapshot_id}",
                )
            leftover = self._snapshot_named(vm, snap_name)
            if leftover is not None:  # the clone holds the bytes now; the VM goes free
                self._remove_snapshot(leftover, f"removing temporary snapshot of {vm_name!r}")
            cloned = {d.key: d for d in self._disks(clone).values()}
            ds, path = flat_path(cloned[source_disk.key].backing.fileName)
            return PrimarySnapshot(
                image=f"[{ds}] {path}",
                image_format="raw",
                overlay=name,
                virtual_size=int(source_disk.capacityInBytes),
                vm_was_running=running,
            )

    # -- backup source ---------------------------------------------------------------------
    def open_reader(self, source: PrimarySnapshot, plan: BackupPlan) -> DatastoreReader:
        ds, _, path = source.image.partition("] ")
        return DatastoreReader(self.session, ds.lstrip("["), path, source.virtual_size)

    # -- release / discard -------------------------------------------------------------------
    def release(
        self,
        *,
        volume: VolumeRef,
        snapshot_id: str,
        source: PrimarySnapshot,
        backed_up: bool = True,
    ) -> None:
        """Destroy the clone (idempotent: a clone already gone is fine)."""
        with _vm_locks[volume.vm.name]:
            clone = self._find_vm(clone_name(volume.vm.name, snapshot_id))
            if clone is not None:
                self._destroy(clone, f"clone of snapshot {snapshot_id}")

    def discard(self, req: DiscardRequest) -> None:
        """A failed take may have left its temporary vSphere snapshot and a clone."""
        with _vm_locks[req.vm.name]:
            vm = self._find_vm(req.vm.name)
            if vm is not None:
                for prefix in (VOLUME_SNAPSHOT_PREFIX, VM_SNAPSHOT_PREFIX):
                    snap = self._snapshot_named(vm, prefix + req.snapshot_id)
                    if snap is not None:
                        self._remove_snapshot(snap, f"removing what take {req.snapshot_id} left")
            clone = self._find_vm(clone_name(req.vm.name, req.snapshot_id))
            if clone is not None:
                self._destroy(clone, f"clone of failed snapshot {req.snapshot_id}")

    # -- revert a volume (from secondary) ----------------------------------------------------
    def revert(self, req: RevertRequest) -> None:
        """Write the verified backup over the powered-off VM's disk, then read it back.

        Refused while the VM has vSphere snapshots: their redo logs are based on that disk,
        so rewriting it underneath them would corrupt every one of them."""
        from ..storage.secondary import SecondaryStore

        vm_name, disk = req.volume.vm.name, req.volume.disk
        if req.manifest_path is None:
            raise InvalidInput(
                f"snapshot {req.snapshot_id} is not backed up yet; on VMware a volume is"
                " reverted from its backup"
            )
        manifest = SecondaryStore.read_manifest(Path(req.manifest_path))
        with _vm_locks[vm_name], SecondaryStore.materialized(manifest) as raw:
            vm = self._vm(vm_name)
            if self._powered_on(vm):
                raise InvalidInput(f"VM {vm_name!r} is running; stop it before reverting {disk!r}")
            held = [n.name for n in self._snapshots(vm)]
            if held:
                raise InvalidInput(
                    f"VM {vm_name!r} has vSphere snapshots {held}: rewriting {disk!r} under"
                    " them would corrupt them; revert to or delete them first"
                )
            ds, path = flat_path(self._disk(vm, vm_name, disk).backing.fileName)
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
        conn = self.session.connection()
        try:
            conn.request(
                "HEAD", self.session.file_url(ds, path), None, {"Cookie": self.session.cookie()}
            )
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        except (OSError, http.client.HTTPException) as exc:
            raise HypervisorUnavailable(f"datastore HEAD of [{ds}] {path} failed: {exc}") from exc
        finally:
            conn.close()

    def _upload_bytes(self, ds: str, path: str, data: bytes) -> None:
        import tempfile

        with tempfile.NamedTemporaryFile() as tmp:
            tmp.write(data)
            tmp.flush()
            self._upload(ds, path, Path(tmp.name))

    def _upload(self, ds: str, path: str, source: Path) -> str:
        status, body, sent = self.session.endpoint.put_file(
            self.session.file_url(ds, path), source, {"Cookie": self.session.cookie()}
        )
        if status not in (200, 201, 204):
            raise HypervisorUnavailable(
                f"datastore PUT of [{ds}] {path} answered {status}: {body!r}"
            )
        return sent

    def _download_digest(self, ds: str, path: str) -> str:
        status, digest = self.session.endpoint.get_sha256(
            self.session.file_url(ds, path), {"Cookie": self.session.cookie()}
        )
        if status != 200:
            raise SourceGone(f"[{ds}] {path}: datastore GET answered {status}")
        return digest

    # -- VM snapshots ------------------------------------------------------------------------
    def take_vm_snapshot(self, op: VmSnapshotOperation) -> VmSnapshotTaken:
        vm_name = op.vm.name
        with _vm_locks[vm_name]:
            vm = self._vm(vm_name)
            running = self._powered_on(vm)
            memory = op.type == VmSnapshotType.DISK_AND_MEMORY
            if memory and not running:
                raise InvalidInput(
                    f"VM {vm_name!r} is stopped: a DiskAndMemory snapshot needs a running VM"
                    " (take a Disk snapshot instead)"
                )
            name = VM_SNAPSHOT_PREFIX + op.snapshot_id
            if self._snapshot_named(vm, name) is None:
                self._run(
                    lambda: vm.CreateSnapshot_Task(
                        name=name,
                        description=f"snapferry VM snapshot {op.snapshot_id}",
                        memory=memory,
                        quiesce=False,
                    ),
                    f"VM snapshot of {vm_name!r}",
                )
            return VmSnapshotTaken(overlays={}, memory=None, vm_was_running=running)

    def _vm_snapshot(self, vm: Any, op: VmSnapshotOperation) -> Any | None:
        return self._snapshot_named(vm, VM_SNAPSHOT_PREFIX + op.snapshot_id)

    def revert_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        """vSphere's own revert; a Disk snapshot needs the VM stopped, as on KVM (vSphere
        would power it off silently), and a DiskAndMemory one resumes it running."""
        vm_name = op.vm.name
        with _vm_locks[vm_name]:
            vm = self._vm(vm_name)
            snap = self._vm_snapshot(vm, op)
            if snap is None:
                raise SourceGone(f"VM snapshot {op.snapshot_id} is gone from {vm_name!r}")
            if op.type == VmSnapshotType.DISK and self._powered_on(vm):
                raise InvalidInput(
                    f"VM {vm_name!r} is running; stop it before reverting to Disk snapshot"
                    f" {op.snapshot_id}"
                )
            self._run(snap.RevertToSnapshot_Task, f"reverting {vm_name!r}")
            if op.type == VmSnapshotType.DISK_AND_MEMORY and not self._powered_on(vm):
                self._run(vm.PowerOnVM_Task, f"resuming {vm_name!r}")

    def delete_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        with _vm_locks[op.vm.name]:
            vm = self._find_vm(op.vm.name)
            snap = self._vm_snapshot(vm, op) if vm is not None else None
            if snap is not None:
                self._remove_snapshot(snap, f"deleting VM snapshot {op.snapshot_id}")
