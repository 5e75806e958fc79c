"""Names, marks and XAPI error codes shared by the XenServer driver's modules."""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from typing import Any

import XenAPI

from ...errors import (
    ChainBusy,
    CredentialsRejected,
    HypervisorUnavailable,
    InvalidInput,
    PermissionDenied,
    SourceGone,
    UnsupportedImage,
)

VOLUME_PREFIX = "snapferry-"
VM_PREFIX = "snapferry-vm-"
RELEASED = "snapferry: released"
TAKE_KEY = "snapferry-take"  # on a VDI's other_config while a take snapshots it
TAKE_TASK_KEY = "snapferry-take-task"  # beside it: that take's Async.VDI.snapshot task
SNAPSHOT_KEY = "snapferry-snapshot"  # on our snapshot VDI's other_config: its snapshot ID
# VM.blocked_operations entries a restore adds (their value starts with RESTORE_BLOCK):
# XAPI refuses these with OPERATION_BLOCKED [vm, value] before it looks at anything else.
RESTORE_BLOCKED_OPS = ("start", "start_on", "resume", "resume_on")
RESTORE_BLOCK = "snapferry: a restore is writing this VM's disk"
TASK_POLL_S = 0.05  # the first poll of a task; then doubling up to TASK_POLL_MAX_S
TASK_POLL_MAX_S = 1.0
IO_CHUNK = 8 * 1024 * 1024
NULL_REF = "OpaqueRef:NULL"
# XAPI has no quiesced snapshot: VM.snapshot_with_quiesce (VSS) is Removed in release
# quebec, Citrix Hypervisor 8.1, API 2.14 (xen-api ocaml/idl/datamodel_vm.ml l.411-417,
# datamodel_types.ml l.323-326; commit 867bf714 "CP-31859 Remove support for VSS"), and
# xapi_vm_lifecycle.ml l.617-623 refuses it on every VM with
# VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED. VM.snapshot and VDI.snapshot ask nothing of the guest.
QUIESCE_REMOVED = (
    "XenServer has no quiesced snapshot (VM.snapshot_with_quiesce, VSS, was removed in"
    " Citrix Hypervisor 8.1; VM.snapshot and VDI.snapshot do not ask the guest to flush)"
)

_VOLUME_LABEL = re.compile(VOLUME_PREFIX + r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")
_UUID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", re.IGNORECASE)

_vm_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


def _failure_error(exc: XenAPI.Failure, what: str) -> Exception:
    """XAPI's error codes as our typed errors: gone and refused are permanent, busy retries."""
    code, *params = [str(x) for x in exc.details] or ["UNKNOWN"]
    message = f"{what}: {code} {params}"
    if code == "SESSION_AUTHENTICATION_FAILED":
        return CredentialsRejected(f"XenServer rejected the credentials ({what})")
    if code in ("HANDLE_INVALID", "UUID_INVALID"):
        return SourceGone(message)
    # SR_BACKEND_FAILURE_109: the VHD chain is too long (SM's limit is 30) until the SR's
    # garbage collector coalesces it; like a busy VDI, that passes with time.
    if code in (
        "VDI_IN_USE",
        "OTHER_OPERATION_IN_PROGRESS",
        "SR_BACKEND_FAILURE_46",
        "SR_BACKEND_FAILURE_109",
    ):
        return ChainBusy(message)
    if code == "INTERNAL_ERROR" and "cannot compute differences" in message.lower():
        # vhd_tool_wrapper.ml send: a delta from or against a VDI that is no VHD (QCOW2 on
        # XCP-ng 8.3, raw VDIs, NBD-only): it can never succeed; a full backup can.
        return UnsupportedImage(
            f"{message}: this VDI cannot have VHD deltas; back it up in full"
            " (SNAPFERRY_SNAPSHOT_DELTA_MAX=0)"
        )
    if code == "INTERNAL_ERROR" and "Illegal_transition" in message:
        # dom0's attach automaton refused a datapath (vdi_automaton.ml: RW asked while
        # another datapath holds the VDI RO, e.g. another client's export): it passes.
        return ChainBusy(message)
    if code == "VDI_TOO_LARGE":  # a VHD export above 2040 GiB (export_raw_vdi.ml)
        return UnsupportedImage(message)
    if code == "VM_BAD_POWER_STATE":
        return InvalidInput(message)
    if code == "RBAC_PERMISSION_DENIED":
        return PermissionDenied(message)
    if code in _NEVER or code.startswith("VM_LACKS_FEATURE"):
        # Refusals no wait changes: an unlicensed feature (Pool_features.assert_enabled:
        # Checkpoint, CBT), a VM that cannot be suspended (no PV drivers, PCI, vGPU,
        # VUSB), an SR or VDI that does not support the operation, an operation an
        # operator blocked (VM.blocked_operations), a template.
        return InvalidInput(f"{message}: XAPI refuses this for good")
    return HypervisorUnavailable(message)


_NEVER = frozenset(
    {
        "LICENCE_RESTRICTION",
        "FEATURE_RESTRICTED",
        "VM_HAS_PCI_ATTACHED",
        "VM_HAS_VGPU",
        "VM_HAS_VUSBS",
        "SR_OPERATION_NOT_SUPPORTED",
        "VDI_INCOMPATIBLE_TYPE",
        "VDI_IS_SHARABLE",
        "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION",
        "UNIMPLEMENTED_IN_SM_BACKEND",
        "OPERATION_BLOCKED",
        "VM_IS_TEMPLATE",
    }
)


_DEVICE = re.compile(r"(?:xvd|hd|sd|vd)([a-p])")


def _userdevice(disk: str) -> str | None:
    """The VBD slot a disk name means: ``xvdb``/``hdb``/``sdb`` -> "1", "1" -> "1"."""
    if disk.isdigit():
        return str(int(disk))
    match = _DEVICE.fullmatch(disk)
    return str(ord(match.group(1)) - ord("a")) if match else None


def _not_a_vm(record: dict[str, Any]) -> str:
    """What a VM record is when it is no VM to act on ('' when it is one)."""
    if record.get("is_a_snapshot"):
        return "a VM snapshot"
    if record.get("is_a_template"):
        return "a template"
    if record.get("is_control_domain"):
        return "a control domain"
    return ""
