"""Names, locks and vSphere facts every part of the VMware driver shares."""

from __future__ import annotations

import contextlib
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import ChainBusy, UnsupportedImage

CLONE_TAG = "-snapferry-"
VOLUME_SNAPSHOT_PREFIX = "snapferry-"
VM_SNAPSHOT_PREFIX = "snapferry-vm-"
TASK_POLL_S = 0.05  # the first poll of a task; then backing off by half each time
TASK_POLL_MAX_S = 2.0  # and never slower than this (nor than a quarter heartbeat timeout)
# DatastoreSummary.type values whose disks are flat files that /folder serves byte for byte.
# vSAN ("vsan", "vsanD") and vVols ("VVOL") keep disks as objects: /folder has no
# -flat.vmdk there and answers 404 (OpenNebula/one#7788, libguestfs/virt-v2v#29).
FLAT_FILE_DATASTORES = {"VMFS", "NFS", "NFS41", "CIFS"}
# A delta's descriptor: <base>-00000N.vmdk (the pattern virt-v2v strips, v2v/vCenter.ml).
MAX_NAME = 80  # vCenter's limit for VM and folder names (see clone_name)
UNSAFE_NAME_RE = re.compile(r"[%/\\]")  # characters vCenter counts as three (escaped)
DELTA_RE = re.compile(r"-\d{6}\.vmdk$")
SAFE_DS_RE = re.compile(r"[^A-Za-z0-9_-]")  # what a datastore's name keeps in a disk name
MOREF_RE = re.compile(r"vm-\d+")
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")

_vm_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
_vm_locks_guard = threading.Lock()


@contextlib.contextmanager
def vm_lock(vm: str) -> Iterator[None]:
    """This worker's lock on one VM's snapshot tree. It fails fast with the retryable
    ChainBusy instead of queueing: a take waiting behind a long clone would hold one of the
    worker's activity slots, and enough of them would stop the worker serving any VM."""
    with _vm_locks_guard:
        lock = _vm_locks[vm]
    if not lock.acquire(blocking=False):
        raise ChainBusy(
            f"another snapshot operation on VM {vm!r} is running on this worker; retried"
        )
    try:
        yield
    finally:
        lock.release()


def clone_name(vm_name: str, snapshot_id: str) -> str:
    """``<vm>-snapferry-<snapshot id>``, within vCenter's 80 characters for VM and folder
    names ("The name is too long. Up to 80 characters may be used (fewer if the characters
    %, \\ or / are used)", VMware KB 2051649; terraform-provider-vsphere validates
    StringLenBetween(1, 80)). ``vm_name`` is the VM's own name, as vCenter reports it, not
    what the operator typed (a moref or a 36-character UUID); its ``%``, ``/`` and ``\\``
    become ``_``, since vCenter counts them escaped (CloneVM_Task: "Any % (percent)
    character used in this name parameter must be escaped"), and it is cut to leave room
    for the snapshot id, which makes the name unique and findable on a retry."""
    tail = CLONE_TAG + snapshot_id
    head = UNSAFE_NAME_RE.sub("_", vm_name)[: max(0, MAX_NAME - len(tail))]
    return head + tail


def flat_path(backing_file: str) -> tuple[str, str]:
    """``[ds1] dir/disk.vmdk`` -> (``ds1``, ``dir/disk-flat.vmdk``): the raw extent of a flat
    disk, which is what the datastore serves byte for byte."""
    ds, _, path = backing_file.partition("] ")
    return ds.lstrip("["), path.removesuffix(".vmdk") + "-flat.vmdk"


def base_backing(backing: Any) -> Any:
    """The base disk's backing under any snapshot deltas.

    After a snapshot, vSphere shows a disk's backing as a delta (``web01-000001.vmdk``)
    whose ``parent`` is the disk it was taken on, down to the base (vSphere API reference,
    VirtualDiskFlatVer2BackingInfo.parent: "The parent of this virtual disk file, if this is
    a delta disk backing. This will be unset if this is not a delta disk backing.")."""
    seen = 0
    while getattr(backing, "parent", None) is not None:
        backing, seen = backing.parent, seen + 1
        if seen > 512:
            raise UnsupportedImage("disk backing chain deeper than 512 (a loop?)")
    return backing


def disk_datastore(device: Any) -> str:
    """The name of the datastore that holds a disk's base file (``[ds1] ...`` -> ``ds1``)."""
    return str(base_backing(device.backing).fileName.partition("] ")[0].lstrip("["))


def disk_keys(devices: list[Any]) -> dict[str, Any]:
    """A VM's disks by every name that means one of them: ``<stem>.<datastore>`` always
    (``web01.ds2``), and the bare stem (``web01``) where no other disk of the VM has it.

    Base file names are unique per datastore, not per VM: ``[ds1] web01/web01.vmdk`` and
    ``[ds2] web01/web01.vmdk`` can be two disks of one VM (vCenter names a disk after the
    VM in the VM's folder on the datastore it is put on; CloudStack finds a disk by base
    name *and* datastore, ``getDiskInfoByBackingFileBaseName(volumePath, dsName)``). A
    bare stem two disks share names neither, so that no device order decides which. A
    datastore's characters outside ``[A-Za-z0-9_-]`` (``datastore1 (1)``, vCenter's
    default for a second local datastore) become ``_`` in the name, which must be a safe
    file name on secondary storage (``datastore1__1_``)."""
    stems = Counter(disk_name(d) for d in devices)
    out: dict[str, Any] = {}
    for d in devices:
        out[qualified_disk_name(d)] = d
        if stems[disk_name(d)] == 1:
            out[disk_name(d)] = d
    return out


def qualified_disk_name(device: Any) -> str:
    """``<stem>.<datastore>``, the datastore made safe (see ``disk_keys``)."""
    return f"{disk_name(device)}.{SAFE_DS_RE.sub('_', disk_datastore(device))}"


def simplest_disk_names(devices: list[Any]) -> list[str]:
    """Each disk's shortest name: its stem, or ``<stem>.<datastore>`` if another has it."""
    stems = Counter(disk_name(d) for d in devices)
    return sorted(
        disk_name(d) if stems[disk_name(d)] == 1 else qualified_disk_name(d) for d in devices
    )


def disk_name(device: Any) -> str:
    """A disk's stem: its *base* file's stem (``web01``, ``web01_1``), which is unique per
    datastore (see ``disk_keys`` for two disks with one stem on two datastores), a
    safe name unlike its label ("Hard disk 1"), and stays the same while
    VM snapshots put deltas on top. A delta name without a parent (an inventory that does
    not fill ``parent``) loses its ``-00000N`` suffix, as virt-v2v does."""
    base = base_backing(device.backing)
    stem = Path(base.fileName.partition("] ")[2]).name
    return DELTA_RE.sub(".vmdk", stem).removesuffix(".vmdk")


def capacity(device: Any) -> int:
    """``capacityInBytes`` (vSphere 5.5 and later), else ``capacityInKB``: older inventories,
    and govmomi's simulator, leave the former unset."""
    if getattr(device, "capacityInBytes", None):
        return int(device.capacityInBytes)
    return int(device.capacityInKB) * 1024
