"""Input validation at the edge, and the exception -> retryability table."""

from __future__ import annotations

import errno
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from snapferry.activities import errors
from snapferry.activities.contracts import SnapshotRequest, VmRef, VolumeRef, new_snapshot_id
from snapferry.workers.schema import EXPORTED, write_schemas


def request(vm: str = "vm1", disk: str = "vda", snapshot_id: str | None = None) -> dict:
    return {
        "snapshot_id": new_snapshot_id() if snapshot_id is None else snapshot_id,
        "volume": {"vm": {"name": vm, "host": "h1"}, "disk": disk},
    }


@pytest.mark.parametrize(
    "vm", ["../etc", "a/b", "..", ".hidden", "", "x" * 129, "vm;rm -rf /", "vm\n", "é"]
)
def test_unsafe_vm_names_are_rejected_with_the_field_named(vm: str) -> None:
    with pytest.raises(ValidationError) as info:
        SnapshotRequest.model_validate(request(vm=vm))
    assert info.value.errors()[0]["loc"] == ("volume", "vm", "name")


@pytest.mark.parametrize(
    "sid",
    [  # fixed, so that every collecting process (xdist) collects the same tests
        "",
        "123",
        "not-a-uuid",
        "../6f1c2a8e-3b7d-4e59-9a10-2c4d8e6f0b13",
        "6F1C2A8E-3B7D-4E59-9A10-2C4D8E6F0B13",
    ],
)
def test_malformed_snapshot_ids_are_rejected(sid: str) -> None:
    with pytest.raises(ValidationError, match="not a snapshot ID"):
        SnapshotRequest.model_validate(request(snapshot_id=sid))


@given(st.text(min_size=1, max_size=40))
def test_every_accepted_name_is_a_single_safe_path_component(name: str) -> None:
    try:
        VolumeRef(vm=VmRef(name=name, host="h"), disk="vda")
    except ValidationError:
        return
    assert "/" not in name and "\x00" not in name and ".." not in name
    assert not name.startswith((".", "-"))


def test_unknown_fields_are_refused() -> None:
    body = request()
    body["volume"]["vm"]["password"] = "hunter2"
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        SnapshotRequest.model_validate(body)


@pytest.mark.parametrize(
    ("cls", "non_retryable"),
    [
        (errors.InvalidInput, True),
        (errors.VmNotFound, True),
        (errors.DiskNotFound, True),
        (errors.UnsupportedImage, True),
        (errors.SecondaryStoreFull, True),
        (errors.BackupCancelled, True),
        (errors.SecondaryStoreUnavailable, False),
        (errors.ImageUnreadable, False),
        (errors.HypervisorUnavailable, False),
        (errors.BackupCorrupt, False),
        (errors.ChainBusy, False),
        (errors.AlertSinkUnavailable, False),
        (errors.BackupStalled, False),
    ],
)
def test_error_table(cls: type[errors.SnapferryError], non_retryable: bool) -> None:
    app = errors.as_application_error(cls("boom"))
    assert app.type == cls.__name__
    assert app.non_retryable is non_retryable
    assert (cls.__name__ in errors.NON_RETRYABLE_ERROR_TYPES) is non_retryable


def test_every_error_is_in_the_table() -> None:
    assert set(errors.ALL_ERRORS) == set(errors.SnapferryError.__subclasses__())


def test_full_store_is_permanent_unmounted_store_is_transient() -> None:
    full = errors.classify_os_error(OSError(errno.ENOSPC, "No space left"), where="/s")
    gone = errors.classify_os_error(OSError(errno.EACCES, "Permission denied"), where="/s")
    assert isinstance(full, errors.SecondaryStoreFull) and full.non_retryable
    assert isinstance(gone, errors.SecondaryStoreUnavailable) and not gone.non_retryable


def test_converts_errors_keeps_other_exceptions_untouched() -> None:
    @errors.converts_errors
    def fails(exc: Exception) -> None:
        raise exc

    with pytest.raises(Exception) as info:
        fails(errors.VmNotFound("VM 'x' does not exist"))
    assert type(info.value).__name__ == "ApplicationError"
    with pytest.raises(KeyError):
        fails(KeyError("k"))


def test_schemas_are_written_for_every_contract(tmp_path) -> None:
    paths = write_schemas(tmp_path)
    assert len(paths) == len(EXPORTED)
    schema = json.loads((tmp_path / "SnapshotRequest.json").read_text())
    assert schema["required"] == ["snapshot_id", "volume"]
