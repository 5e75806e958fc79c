"""Operations on an existing volume snapshot: verify its backup, check that it boots,
restore it as a new volume or template, revert its VM's disk to it, and follow its VM to
another host.

VolumeSnapshotWorkflow (workflows/snapshot.py) takes these as updates through
:class:`SnapshotOperations`, which it inherits; like every operation of an entity, each runs
one at a time (:meth:`EntityWorkflow._operation`).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from snapferry.activities.contracts import (
        AlertSeverity,
        BootCheck,
        BootCheckOptions,
        BootCheckRequest,
        HypervisorType,
        RestoreKind,
        RestoreRequest,
        RestoreResult,
        RevertRequest,
        SnapshotRecord,
        SnapshotRequest,
        SnapshotState,
        validate_name,
    )
    from snapferry.activities.errors import NON_RETRYABLE_ERROR_TYPES
    from snapferry.activities.names import (
        CHECK_BOOT,
        RESTORE_BACKUP,
        REVERT_VOLUME,
        VERIFY_BACKUP,
    )

from .entity import EntityWorkflow, cause_message, update_id
from .routing import BACKUP_QUEUE, HOST_HEARTBEAT_TIMEOUT, host_queue

VERIFY_BACKUP_UPDATE = "verify_backup"
CHECK_BOOT_UPDATE = "check_boot"
CREATE_VOLUME_UPDATE = "create_volume"
CREATE_TEMPLATE_UPDATE = "create_template"
REVERT_UPDATE = "revert_volume"
MOVE_HOST_UPDATE = "move_host"

OPERATION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=3,
    non_retryable_error_types=NON_RETRYABLE_ERROR_TYPES,
)

# Verify and restore heartbeat as they go (activities/restore.py): a lost backup worker is
# noticed after this, not at the 12 h start-to-close bound, which stays as a last resort.
# Only a schedule attribute changes (no new command), so old histories replay unchanged.
OPERATION_HEARTBEAT_TIMEOUT = timedelta(seconds=30)


class SnapshotOperations(EntityWorkflow):
    """The update handlers for operations on an existing snapshot; the workflow that
    inherits them sets ``req``, ``record`` and ``deleting``."""

    req: SnapshotRequest
    record: SnapshotRecord
    deleting: bool

    async def _alert(self, event: str, message: str, severity: AlertSeverity) -> None:
        raise NotImplementedError  # the workflow's own (workflows/snapshot.py)

    def _require_backup(self, what: str) -> str:
        hidden = self.record.state == SnapshotState.HIDDEN  # deleted (even across runs)
        if self.deleting or hidden or self.record.delete_error or self.record.backup is None:
            self._refuse(f"cannot {what}: it is {self.record.state.value}, not BackedUp")
        assert self.record.backup is not None
        return self.record.backup.manifest_path

    @workflow.update(name=VERIFY_BACKUP_UPDATE)
    async def verify_backup(self) -> str:
        """Re-read the backup and check it against its manifest checksum."""
        manifest = self._require_backup("verify its backup")
        async with self._operation():
            checksum: str = await workflow.execute_activity(
                VERIFY_BACKUP,
                manifest,
                task_queue=BACKUP_QUEUE,
                start_to_close_timeout=timedelta(hours=12),
                heartbeat_timeout=OPERATION_HEARTBEAT_TIMEOUT,
                retry_policy=OPERATION_RETRY,
            )
        return checksum

    @workflow.update(name=CHECK_BOOT_UPDATE)
    async def check_boot(self, options: BootCheckOptions) -> SnapshotRecord:
        """Boot a throwaway VM from the backup on the snapshot's host and wait for a sign of
        life; the outcome is kept as ``verified_boot``, and a failed check raises an alert.
        The backup is only read."""
        self._require_backup("check that it boots")
        async with self._operation():
            await self._boot_check(options)
        return self.record

    async def _boot_check(self, options: BootCheckOptions) -> None:
        """Run the check on the VM's host, keep its outcome, alert on a failure (a check
        that could not run at all is a failed one too: it proved nothing)."""
        assert self.record.backup is not None
        try:
            check: BootCheck = await workflow.execute_activity(
                CHECK_BOOT,
                BootCheckRequest(
                    snapshot_id=self.req.snapshot_id,
                    volume=self.req.volume,
                    manifest_path=self.record.backup.manifest_path,
                    options=options,
                ),
                result_type=BootCheck,
                task_queue=host_queue(self.req.volume.vm.host),
                heartbeat_timeout=HOST_HEARTBEAT_TIMEOUT,
                start_to_close_timeout=timedelta(seconds=options.timeout_s) + timedelta(minutes=5),
                retry_policy=OPERATION_RETRY,
            )
        except ActivityError as err:
            check = BootCheck(
                ok=False, at=workflow.now(), detail=f"the check did not run: {cause_message(err)}"
            )
        self.record.verified_boot = check
        if not check.ok:
            await self._alert(
                "SNAPSHOT.BOOT_CHECK.FAILED",
                f"snapshot {self.req.snapshot_id}'s backup did not boot: {check.detail}",
                AlertSeverity.ERROR,
            )

    @check_boot.validator
    def _validate_check_boot(self, options: BootCheckOptions) -> None:
        hypervisor = self.req.volume.vm.hypervisor
        if hypervisor != HypervisorType.KVM:
            self._refuse(f"boot checks run on KVM hosts; {hypervisor.value} has none")
        self._require_backup("check that it boots")

    async def _restore(self, kind: RestoreKind, name: str) -> RestoreResult:
        manifest = self._require_backup(f"create a {kind.value} from it")
        primary = self.record.primary
        assert primary is not None
        async with self._operation():
            result: RestoreResult = await workflow.execute_activity(
                RESTORE_BACKUP,
                RestoreRequest(
                    snapshot_id=self.req.snapshot_id,
                    volume=self.req.volume,
                    kind=kind,
                    name=name,
                    manifest_path=manifest,
                    primary_dir=primary.image.rsplit("/", 1)[0],
                ),
                result_type=RestoreResult,
                task_queue=BACKUP_QUEUE,
                start_to_close_timeout=timedelta(hours=12),
                heartbeat_timeout=OPERATION_HEARTBEAT_TIMEOUT,
                retry_policy=OPERATION_RETRY,
            )
            self.record.restored.append(result.path)
        return result

    @workflow.update(name=CREATE_VOLUME_UPDATE)
    async def create_volume(self, name: str) -> RestoreResult:
        return await self._restore(RestoreKind.VOLUME, name)

    @workflow.update(name=CREATE_TEMPLATE_UPDATE)
    async def create_template(self, name: str) -> RestoreResult:
        return await self._restore(RestoreKind.TEMPLATE, name)

    @create_volume.validator
    def _validate_create_volume(self, name: str) -> None:
        self._validate_restore(name)

    @create_template.validator
    def _validate_create_template(self, name: str) -> None:
        self._validate_restore(name)

    def _validate_restore(self, name: str) -> None:
        try:
            validate_name(name)
        except ValueError as err:
            self._refuse(str(err))
        self._require_backup("restore it")

    @workflow.update(name=REVERT_UPDATE)
    async def revert_volume(self) -> SnapshotRecord:
        """Revert the (stopped) VM's disk to this snapshot: from primary while the frozen
        image is there, else from the verified backup."""
        async with self._operation():
            await workflow.execute_activity(
                REVERT_VOLUME,
                RevertRequest(
                    snapshot_id=self.req.snapshot_id,
                    volume=self.req.volume,
                    primary=None if self.record.primary_released else self.record.primary,
                    manifest_path=self.record.backup.manifest_path if self.record.backup else None,
                    operation_id=update_id(),
                ),
                task_queue=host_queue(self.req.volume.vm.host),
                heartbeat_timeout=HOST_HEARTBEAT_TIMEOUT,
                start_to_close_timeout=timedelta(hours=12),
                retry_policy=OPERATION_RETRY,
            )
            self.record.reverts += 1
        return self.record

    @revert_volume.validator
    def _validate_revert(self) -> None:
        usable = self.record.backup is not None or (
            self.record.primary is not None and not self.record.primary_released
        )
        gone = self.record.state in (SnapshotState.HIDDEN, SnapshotState.ERROR)
        if self.deleting or not usable or gone:
            self._refuse(f"cannot revert to it while it is {self.record.state.value}")

    @workflow.update(name=MOVE_HOST_UPDATE)
    def move_host(self, host: str) -> SnapshotRecord:
        """The VM now runs on ``host`` (after a live migration, say): every later host
        operation of this snapshot (release, revert) goes to that host's queue. Sent by
        management code, or ``snapferry vm moved``, since the one who migrates knows."""
        self.req.volume.vm.host = host
        self.record.host = host
        return self.record

    @move_host.validator
    def _validate_move_host(self, host: str) -> None:
        self._validate_host(host)
