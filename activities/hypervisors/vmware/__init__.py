"""VMware through pyvmomi: a full clone per volume snapshot, exported over datastore HTTP.

Take (the spec's rule: "a full clone, as a thin clone would affect the VM until the backup is
done"): a vSphere snapshot of the VM without memory or quiesce, a *full* clone of the VM
from that snapshot (``moveAllDiskBackingsAndDisallowSharing``) that leaves out every disk
but the requested one (``spec.config.deviceChange`` removals, see ``VmwareDriver._clone``),
then the vSphere snapshot is removed. The clone's disk is the snapshot's primary copy; the
source VM keeps running on its own disks and carries no snapshot of ours, so it is free
while the backup runs.

Backup: the clone's flat disk is streamed into the copy engine with few large HTTP
``Range`` requests (one per GiB window, over one kept-alive connection) on
``/folder/<path>?dcPath=..&dsName=..`` (the datastore file protocol), so a resumed backup
asks only for the bytes after its checkpoint. Release destroys the clone: one clone per
snapshot, tracked by its record, named after it.

VM snapshots are vSphere snapshots named ``snapferry-vm-<id>``; they live in the VM's own
snapshot tree, where a volume snapshot's temporary vSphere snapshot comes and goes without
touching them. Every object is found by name each time, so no stored reference goes stale.

Credentials: ``SNAPFERRY_VCENTER_*`` (see settings); the password is read at login from a
file or the environment and never leaves this process.
"""

from __future__ import annotations

from .common import CLONE_TAG, VM_SNAPSHOT_PREFIX, VOLUME_SNAPSHOT_PREFIX, clone_name, flat_path
from .reader import STREAM_WINDOW, DatastoreReader
from .restore import RestoreOps
from .session import VsphereSession
from .take import TakeOps
from .vm_snapshots import VmSnapshotOps

__all__ = [
    "CLONE_TAG",
    "STREAM_WINDOW",
    "VM_SNAPSHOT_PREFIX",
    "VOLUME_SNAPSHOT_PREFIX",
    "DatastoreReader",
    "VmwareDriver",
    "VsphereSession",
    "clone_name",
    "flat_path",
]


class VmwareDriver(TakeOps, RestoreOps, VmSnapshotOps):
    """The HypervisorDriver for vCenter (registry name ``vmware``)."""
