"""Activity and signal names: the contract between workflows and workers.

Workflows refer to activities by these names only, so workflow code never imports a driver
(and never libvirt), and tests can register mocks under the real names.
"""

TAKE_SNAPSHOT = "take_snapshot"
RELEASE_PRIMARY = "release_primary"
# After a take failed for good: remove whatever its attempts left (an overlay, a memory file).
DISCARD_SNAPSHOT = "discard_snapshot"
# Before a policy is created: the VM and disk exist on the host (a typo is refused at once).
CHECK_VOLUME = "check_volume"
CHECK_BOOT = "check_boot"
RUN_INSTANT_VM = "run_instant_vm"
COPY_INSTANT_VM = "copy_instant_vm"
BACKUP_SNAPSHOT = "backup_snapshot"
# The backup repository's jobs (backup pool): verify, gc, sync, each a workflow a schedule starts.
RUN_REPOSITORY_JOB = "run_repository_job"
RAISE_ALERT = "raise_alert"

BACKUP_PROGRESS_SIGNAL = "backup_progress"

# Operations on existing snapshots (backup pool: they read or change secondary storage).
DELETE_BACKUP = "delete_backup"
RESTORE_BACKUP = "restore_backup"
VERIFY_BACKUP = "verify_backup"
# On the host: revert a stopped VM's disk.
REVERT_VOLUME = "revert_volume"

# A reset snapshot workflow waits for the backup child its earlier run started (control queue).
AWAIT_BACKUP_WORKFLOW = "await_backup_workflow"
# The search attribute holding a snapshot's state: a reset run reads its earlier runs' there.
SNAPSHOT_STATE_ATTRIBUTE = "SnapshotState"
# What an earlier run of a deleted snapshot ended as (a reset run stays that).
DELETED_STATES = ("Destroyed", "Hidden")

# Recurring policies (control queue): retention deletes the oldest snapshots beyond N.
APPLY_RETENTION = "apply_retention"
# The snapshot workflow's delete update, which retention sends, and its record query,
# which retention reads for the snapshot's creation time.
DELETE_SNAPSHOT_UPDATE = "delete_snapshot"
SNAPSHOT_RECORD_QUERY = "record"

# VM snapshots (host queue): every disk of a VM at once, optionally with its memory.
TAKE_VM_SNAPSHOT = "take_vm_snapshot"
# Whether this host deleted a VM snapshot already (a reset run asks before going Ready).
VM_SNAPSHOT_DELETED = "vm_snapshot_deleted"
REVERT_VM_SNAPSHOT = "revert_vm_snapshot"
DELETE_VM_SNAPSHOT = "delete_vm_snapshot"
