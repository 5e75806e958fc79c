"""Task queues and search attributes: where work runs, and how operators find it.

Hypervisor operations run on host-pinned queues (one worker per hypervisor host, like
CloudStack's agent); backups share one queue whose workers bound their concurrency, which is
the spec's "separate thread pool"; workflows run on the control queue.
"""

import hashlib
import hmac
from datetime import timedelta

from temporalio.common import SearchAttributeKey

CONTROL_QUEUE = "snapferry"
BACKUP_QUEUE = "snapferry-backup"
ALERT_QUEUE = "snapferry-alerts"

# Long host operations (reverts, releases, deletes, discards) heartbeat every few seconds
# (activities/host.py): a dead host worker is noticed in a minute, not at their
# start-to-close bounds, which stay as a last resort.
HOST_HEARTBEAT_TIMEOUT = timedelta(seconds=60)


def host_queue(host: str) -> str:
    return f"snapferry-host-{host}"


def host_alias(host: str, routing_key: bytes | None) -> str:
    """The name a host is routed under while payload encryption is on, so that no history
    (task queue names are not payloads) carries a host name. Keyed with the codec keys
    file's ``routing_key``, which must never change while workflows run (unlike the
    encryption keys, which rotate); without one, a plain SHA-256."""
    if routing_key:
        digest = hmac.new(routing_key, host.encode(), hashlib.sha256).hexdigest()
    else:
        digest = hashlib.sha256(host.encode()).hexdigest()
    return f"h{digest[:20]}"


VOLUME_ID = SearchAttributeKey.for_keyword("VolumeId")
VM_ID = SearchAttributeKey.for_keyword("VmId")
SNAPSHOT_ID = SearchAttributeKey.for_keyword("SnapshotId")
SNAPSHOT_STATE = SearchAttributeKey.for_keyword("SnapshotState")
HYPERVISOR = SearchAttributeKey.for_keyword("Hypervisor")
POLICY_ID = SearchAttributeKey.for_keyword("PolicyId")

SEARCH_ATTRIBUTES = (VOLUME_ID, VM_ID, SNAPSHOT_ID, SNAPSHOT_STATE, HYPERVISOR, POLICY_ID)

VOLUME_SNAPSHOT_WORKFLOW = "VolumeSnapshot"
VM_SNAPSHOT_WORKFLOW = "VmSnapshot"
SNAPSHOT_POLICY_RUN_WORKFLOW = "SnapshotPolicyRun"
BACKUP_SNAPSHOT_WORKFLOW = "BackupSnapshot"
CHECK_VOLUME_WORKFLOW = "CheckVolume"
REPOSITORY_JOB_WORKFLOW = "RepositoryJob"
INSTANT_RESTORE_WORKFLOW = "InstantRestore"


def volume_id(vm: str, disk: str) -> str:
    return f"{vm}:{disk}"


def snapshot_workflow_id(snapshot_id: str) -> str:
    return f"volume-snapshot-{snapshot_id}"


def vm_snapshot_workflow_id(snapshot_id: str) -> str:
    return f"vm-snapshot-{snapshot_id}"


def backup_workflow_id(snapshot_id: str, round_: int) -> str:
    return f"backup-{snapshot_id}-{round_}"


def policy_schedule_id(policy_id: str) -> str:
    return f"snapshot-policy-{policy_id}"


def repository_schedule_id(kind: str) -> str:
    """One schedule per repository job (``repository-verify``, ``-gc``, ``-sync``)."""
    return f"repository-{kind}"
