"""What every payload contract stands on: the name and snapshot-ID rules (validated at the
edge, so that no path traversal reaches a driver or the store), the base model, and the
references to a VM and a volume with the hypervisor and consistency enums they carry.

``activities.contracts`` re-exports all of it; import from there.
"""

from __future__ import annotations

import re
import uuid
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def validate_name(value: str) -> str:
    """Reject anything that could escape a directory or confuse a shell or a URL."""
    if not _NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{value!r} is not a valid name: use 1-128 characters of letters, digits, '.', '_'"
            " or '-', starting with a letter or digit, and no '..'"
        )
    return value


def validate_snapshot_id(value: str) -> str:
    if not _UUID_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a snapshot ID: expected a lowercase UUID")
    return value


SafeName = Annotated[str, AfterValidator(validate_name)]
SnapshotId = Annotated[str, AfterValidator(validate_snapshot_id)]


def new_snapshot_id() -> str:
    """Snapshot IDs are UUIDs, as in CloudStack, so that they are unique across clouds."""
    return str(uuid.uuid4())


class Model(BaseModel):
    """The base of every contract: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class Quiesce(StrEnum):
    """Whether a take asks the guest to flush and freeze its file systems first (CloudStack's
    ``quiescevm``): ``no`` takes a crash-consistent snapshot, ``yes`` an application-consistent
    one or none at all (refused before anything is taken, with the reason), ``try`` an
    application-consistent one when the guest can be quiesced, else a crash-consistent one
    that says why in its record."""

    NO = "no"
    YES = "yes"
    TRY = "try"


class Consistency(StrEnum):
    """What a snapshot holds: ``application``, the guest's file systems flushed and frozen
    at the instant (or the VM stopped, nothing in flight), or ``crash``, what a power cut
    would have left on the disk."""

    APPLICATION = "application"
    CRASH = "crash"


class HypervisorType(StrEnum):
    KVM = "kvm"
    VMWARE = "vmware"
    XENSERVER = "xenserver"


class VmRef(Model):
    """A VM as the hypervisor knows it, and the host whose worker owns it."""

    name: SafeName = Field(description="Domain / VM name on the hypervisor")
    host: SafeName = Field(description="Hypervisor host; selects the host-pinned task queue")
    hypervisor: HypervisorType = HypervisorType.KVM


class VolumeRef(Model):
    vm: VmRef
    disk: SafeName = Field(description="Disk target on the VM, for example 'vda'")
