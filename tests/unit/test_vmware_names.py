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
