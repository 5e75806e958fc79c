"""What the volume snapshot workflow's parts share: its retry policy for host operations,
its patch IDs (each names a change older histories replay without), the names callers
use for its updates, query and signal, and its search attributes."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributePair, TypedSearchAttributes

with workflow.unsafe.imports_passed_through():
    from snapferry.activities.contracts import SnapshotRequest, SnapshotState
    from snapferry.activities.errors import NON_RETRYABLE_ERROR_TYPES
    from snapferry.activities.names import DELETE_SNAPSHOT_UPDATE, SNAPSHOT_RECORD_QUERY

from .routing import HYPERVISOR, POLICY_ID, SNAPSHOT_ID, SNAPSHOT_STATE, VM_ID, VOLUME_ID, volume_id

HOST_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
    non_retryable_error_types=NON_RETRYABLE_ERROR_TYPES,
)

ENTITY_PATCH = "snapshot-stays-open-as-entity"
DELETE_RETRY_PATCH = "failed-delete-can-be-sent-again"
ONE_BACKUP_PER_ROUND_PATCH = "one-backup-child-per-round"
DISCARD_PATCH = "discard-what-a-failed-take-left"
HIDDEN_PATCH = "hidden-chain-members"
TAKE_HEARTBEAT_PATCH = "vmware-take-bounded-by-heartbeats"
# A backed-up snapshot may still hold primary space as the next delta's base (a KVM layer,
# a XenServer VDI): its delete gives that back too.
RELEASE_BASE_ON_DELETE_PATCH = "delete-releases-a-kept-delta-base"
# A delete whose release fails is a failed delete (Error, delete_error, sent again): ending
# Destroyed would leave its layer in the chain unmarked, owned by no workflow.
DELETE_RELEASE_PATCH = "a-failed-release-fails-the-delete"
# A failed take whose leftovers could not be removed stays open in Error, deletable: its
# delete runs the discard again.
DISCARD_ON_DELETE_PATCH = "a-delete-discards-what-a-failed-take-left"
# A reset run whose adopted backup ended without a backup because the snapshot was deleted
# (during that backup, or after it failed): it stays Destroyed, not CreatedOnPrimary.
RESET_OF_DELETED_PATCH = "reset-of-a-snapshot-deleted-before-its-backup"
RELEASE_FAILED = "its primary copy could not be merged away"
TAKE_LAST_RESORT = timedelta(days=1)
PURGED_SIGNAL = "purged"

WAIT_TAKEN_UPDATE = "wait_taken"
RETRY_BACKUP_UPDATE = "retry_backup"
RECORD_QUERY = SNAPSHOT_RECORD_QUERY
DELETE_UPDATE = DELETE_SNAPSHOT_UPDATE
CANCEL_BACKUP_UPDATE = "cancel_backup"


def search_attributes(req: SnapshotRequest, state: SnapshotState) -> TypedSearchAttributes:
    vm = req.volume.vm
    return TypedSearchAttributes(
        [
            SearchAttributePair(VOLUME_ID, volume_id(vm.name, req.volume.disk)),
            SearchAttributePair(VM_ID, vm.name),
            SearchAttributePair(SNAPSHOT_ID, req.snapshot_id),
            SearchAttributePair(SNAPSHOT_STATE, state.value),
            SearchAttributePair(HYPERVISOR, vm.hypervisor.value),
        ]
        + ([SearchAttributePair(POLICY_ID, req.policy_id)] if req.policy_id else [])
    )
