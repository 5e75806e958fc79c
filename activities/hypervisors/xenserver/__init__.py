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
verified) and written with ``PUT /import_raw_vdi``, then read back and compared. A new
volume is sent as a VHD of the backup's data blocks (``format=vhd``) where XAPI takes the
new VDI as pre-zeroed, so a thin SR allocates only those; a revert, and a new volume on a
legacy LVM SR, are written raw, every byte (a thin disk is then fully allocated).

VM snapshots: ``VM.snapshot`` (Disk) or ``VM.checkpoint`` (DiskAndMemory), named
``snapferry-vm-<id>``; ``VM.revert``; delete destroys the snapshot VM and its VDIs.

Long calls (``VM.snapshot``, ``VM.checkpoint``, ``VM.revert``, ``VM.start``, ``VM.resume``,
``VDI.snapshot``, ``VDI.destroy``) are made as ``Async.*`` and their task polled: the activity
heartbeats while one runs, a failed task is the error the synchronous call would give, a
cancelled activity cancels its task (``task.cancel``; XAPI still ends a ``VM.revert``), and
every task is destroyed once its end is read.

A VM is named by its UUID or its label. ``VM.get_by_name_label`` answers every VM object
with that label: templates, snapshots (labelled as their creator chose, possibly like the VM)
and control domains are dropped, and a label that still names several VMs is refused with
their UUIDs, so that no operation acts on a VM the operator did not mean.
"""

from .driver import XenServerDriver
from .export import VhdExportReader
from .session import XapiSession

__all__ = ["VhdExportReader", "XapiSession", "XenServerDriver"]
