"""The simulated datastores: their folders on the local disk, the flat files and
descriptors of each VM's disks, DatastoreSummary, and FileManager's delete.

Disk bytes live as files under ``<root>/<datastore>/<VM folder>`` so tests can compare them
directly; a copy writes only the allocated extents (``sparse_copy``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pyVmomi import vim

from .objects import DATASTORES, DS

if TYPE_CHECKING:
    from .snapshots import Snap
    from .vms import Vm


def sparse_copy(src: Path, dst: Path) -> int:
    """Copy only the allocated extents (SEEK_DATA/SEEK_HOLE) so big zero disks stay cheap;
    returns the bytes written (what a test counts as a clone's copy cost)."""
    size, written = src.stat().st_size, 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fd, pos = fin.fileno(), 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            fin.seek(start)
            fout.seek(start)
            while start < end:
                chunk = fin.read(min(1 << 20, end - start))
                fout.write(chunk)
                start += len(chunk)
                written += len(chunk)
            pos = end
        fout.truncate(size)
    return written


# Datastore types whose VM disks are not files with a ``-flat.vmdk`` extent: ``/folder``
# answers 404 for them (OpenNebula/one#7788 for vSAN, libguestfs/virt-v2v#29). The names
# are DatastoreSummary.type's (HostFileSystemVolumeFileSystemType: VMFS, NFS, NFS41, CIFS,
# vsan, VFFS, VVOL, PMEM, vsanD, OTHER; vSphere Web Services API reference).
NO_FLAT_FILES = {"vsan", "vsanD", "VVOL"}


class DatastoreFiles:
    """The datastores' part of the Inventory (see inventory.py)."""

    def _init_datastores(self, root: Path) -> None:
        self.ds_dirs: dict[str, Path] = {}
        for name in DATASTORES:
            (root / name).mkdir(parents=True, exist_ok=True)
            self.ds_dirs[name] = (root / name).resolve()
        self.ds_dir = self.ds_dirs[DS]
        self.ds_types = {name: "VMFS" for name in DATASTORES}
        self.datastore_gone = False
        # Test control: whether the login holds the privileges HTTP access to a datastore
        # file needs: Datastore.Browse and Datastore.FileManagement on the datacenter and
        # the datastore ("Privilege Requirements for HTTP Access", vSphere Web Services SDK
        # Programming Guide). Without them /folder answers 403 Forbidden: the guide gives
        # no status, and 403 is HTTP's for an authenticated request the server refuses
        # (RFC 9110, 15.5.4).
        self.file_access = True
        self.ds_type = "VMFS"
        self.ignore_range = False
        self.cut_after: int | None = None  # test control: the next /folder GET stops early
        self.folder_gets: list[int] = []  # test control: each /folder GET's client port

    def disk_file(self, vm: Vm, index: int, snap: Snap | None = None) -> Path:
        base = vm.bases[index]
        suffix = f"-snap{snap.id}" if snap else ""
        return self.ds_dirs[vm.disk_ds[index]] / vm.dir / f"{base}{suffix}-flat.vmdk"

    def vm_folders(self, vm: Vm) -> list[Path]:
        """The VM's folder on each datastore that holds its files (home first)."""
        names = dict.fromkeys([vm.home_ds, *vm.disk_ds])
        return [self.ds_dirs[n] / vm.dir for n in names]

    def _check_datastore(self, what: str) -> None:
        if self.datastore_gone:
            raise vim.fault.FileNotFound(file=f"[{DS}] {what}", msg=f"datastore {DS} is gone")

    def _write_disks(self, vm: Vm, sources: list[Path] | None) -> None:
        """Create a VM's flat files (copies of ``sources`` or zero-filled) and descriptors."""
        (self.ds_dirs[vm.home_ds] / vm.dir).mkdir(parents=True, exist_ok=False)
        for folder in self.vm_folders(vm):
            folder.mkdir(parents=True, exist_ok=True)
        for i, size in enumerate(vm.disks):
            flat = self.disk_file(vm, i)
            if sources:
                sparse_copy(sources[i], flat)
            else:
                with open(flat, "wb") as f:
                    f.truncate(size)
            base = vm.bases[i]
            (flat.parent / f"{base}.vmdk").write_text(
                '# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\nCID=fffffffe\n'
                'parentCID=ffffffff\ncreateType="vmfs"\n\n# Extent description\n'
                f'RW {size // 512} VMFS "{base}-flat.vmdk"\n\n# The Disk Data Base\n#DDB\n\n'
                'ddb.adapterType = "lsilogic"\nddb.virtualHWVersion = "19"\n'
            )

    @property
    def ds_type(self) -> str:
        return self.ds_types[DS]

    @ds_type.setter
    def ds_type(self, value: str) -> None:
        self.ds_types[DS] = value

    def _ds_summary(self, name: str = DS) -> vim.Datastore.Summary:
        """DatastoreSummary as vSphere fills it; ``type`` is what a take checks (vsan and
        VVOL datastores hold no ``-flat.vmdk``, see NO_FLAT_FILES)."""
        usage = shutil.disk_usage(self.ds_dirs[name])
        return vim.Datastore.Summary(
            datastore=DATASTORES[name],
            name=name,
            url=f"ds:///vmfs/volumes/{name}/",
            capacity=usage.total,
            freeSpace=usage.free,
            type=self.ds_types[name],
            accessible=not self.datastore_gone,
            multipleHostAccess=True,
            maintenanceMode="normal",
        )

    def delete_datastore_file(self, name: str) -> None:
        """FileManager.DeleteDatastoreFile_Task: "Deletes the specified file or folder from
        the datastore. [...] Folder deletes are always recursive." A missing file is
        FileNotFound (vSphere API reference, its faults; govmomi's simulator answers the same,
        simulator/file_manager.go)."""
        ds, _, rel = name.partition("] ")
        self._check_datastore(name)
        root = self.ds_dirs.get(ds.lstrip("["))
        target = (root / rel).resolve() if root else None
        if root is None or target is None or not rel or not target.is_relative_to(root):
            raise vim.fault.InvalidDatastore(name=ds.lstrip("["), msg=f"no datastore path {name}")
        if not target.exists():
            raise vim.fault.FileNotFound(file=name, msg=f"File {name} was not found")
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
