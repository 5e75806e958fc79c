"""Clone names within vCenter's 80 characters, whatever the VM is called."""

from __future__ import annotations

import pytest

from snapferry.activities.contracts import new_snapshot_id
from snapferry.activities.hypervisors.vmware import clone_name
from tests.vsphere_sim.inventory import MAX_NAME, escaped_length


@pytest.mark.parametrize(
    "vm_name",
    [
        "web01",
        "a" * 33,
        "payments-ledger-primary-database-eu-west-1-production-cluster-a01",
        "x" * 80,
        "fin%2fsales/web\\01 % done",
        "42188f9b-3a5c-7d2e-9b1a-0c6e8d4f2a11",
    ],
)
def test_a_clone_name_fits_80_escaped_characters_and_carries_the_snapshot(vm_name: str) -> None:
    sid = new_snapshot_id()
    name = clone_name(vm_name, sid)
    assert escaped_length(name) <= MAX_NAME and len(name) <= MAX_NAME
    assert name.endswith(f"-snapferry-{sid}") and not set("%/\\") & set(name)
    assert clone_name(vm_name, sid) == name  # the same on every retry


def test_a_short_name_is_kept_whole() -> None:
    assert clone_name("web01", "s1") == "web01-snapferry-s1"


def _disk(key: int, file_name: str) -> object:
    from pyVmomi import vim

    backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=file_name)
    return vim.vm.device.VirtualDisk(key=key, backing=backing)


def test_disk_names_are_unique_per_datastore_and_safe_file_names() -> None:
    """Two disks with one stem on two datastores have only their qualified names, the
    datastore's unsafe characters made ``_`` (vCenter calls a second local datastore
    ``datastore1 (1)``); a stem no other disk has is also its name alone."""
    from snapferry.activities.contracts import VolumeRef
    from snapferry.activities.hypervisors.vmware.common import disk_keys, simplest_disk_names

    devices = [
        _disk(2000, "[datastore1] web01/web01.vmdk"),
        _disk(2001, "[datastore1 (1)] web01/web01.vmdk"),
        _disk(2002, "[datastore1] web01/web01_1.vmdk"),
    ]
    names = disk_keys(devices)
    assert {n: d.key for n, d in names.items()} == {
        "web01.datastore1": 2000,
        "web01.datastore1__1_": 2001,
        "web01_1.datastore1": 2002,
        "web01_1": 2002,
    }
    assert simplest_disk_names(devices) == ["web01.datastore1", "web01.datastore1__1_", "web01_1"]
    for name in names:  # each is a disk name the API accepts
        VolumeRef.model_validate({"vm": {"name": "web01", "host": "h"}, "disk": name})
