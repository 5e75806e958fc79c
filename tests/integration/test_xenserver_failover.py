"""The pool master goes away, through the real XenAPI client and tests/xapi_sim.

With HA, a member whose master left the live set proposes itself and becomes the master
(xen-api ``xapi_ha.ml`` ``on_master_failure`` l.137-171, ``Xapi_pool_transition.
become_master``), and the old master may stay dead; every other member, and the old master
once it is back, answers a login with ``HOST_IS_SLAVE [master address]`` (``xapi_session.ml``
l.996-1001). Sessions are not in the database a new master starts from
(``datamodel.ml`` l.237-242, ``PersistNothing``). ``Host.address`` is the management IP,
which need not be the address a client reaches the host by (NAT, a name)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from snapferry.activities.contracts import (
    BackupPlan,
    PrimarySnapshot,
    VmRef,
    VmSnapshotOperation,
    VmSnapshotType,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import HypervisorUnavailable
from snapferry.activities.hypervisors.xenserver import XenServerDriver
from snapferry.workers.demo_vm import MIB
from tests.xapi_sim.control import (
    create_vm,
    guest_write,
    list_hosts,
    list_vdis,
    list_vms,
    set_host_address,
    set_pool,
    set_task_delay,
)

from ..conftest import Xapi
from .test_xenserver_xapi import read_all

pytestmark = pytest.mark.integration


def volume(vm: str) -> VolumeRef:
    return VolumeRef(vm=VmRef(name=vm, host="xen-host", hypervisor="xenserver"), disk="xvda")


def take_allowing_one_retry(d: XenServerDriver, vm: str) -> PrimarySnapshot:
    """A take as its activity runs it: a call cut by the master's death is
    HypervisorUnavailable (its outcome unknown), and the retry must get through."""
    sid = new_snapshot_id()
    try:
        return d.take(volume=volume(vm), snapshot_id=sid)
    except HypervisorUnavailable:
        return d.take(volume=volume(vm), snapshot_id=sid)


def test_a_dead_master_is_replaced_by_the_member_ha_promoted(xapi: Xapi) -> None:
    """The driver learned the pool's members while connected; the master dies and HA
    promotes the member. The next take gets through the member, as master now."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "ha01", [4 * MIB], shared=True)
    guest_write(xapi.port, "ha01", 0, b"before")
    d.take(volume=volume("ha01"), snapshot_id=new_snapshot_id())
    member = next(h for h in list_hosts(xapi.port) if not h["master"])
    set_pool(xapi.port, master=2, down=[1])
    snap = take_allowing_one_retry(d, "ha01").image
    assert d.session.master_url == f"http://127.0.0.1:{member['port']}"
    assert snap in {v["uuid"] for v in list_vdis(member["port"]) if v["is_a_snapshot"]}


def test_a_member_that_is_a_slave_names_the_new_master(xapi: Xapi) -> None:
    """The configured master dies; the only member the driver can reach is a slave of the
    new master, which HOST_IS_SLAVE names: a login there is followed to that master."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "ha02", [4 * MIB], shared=True)
    d.take(volume=volume("ha02"), snapshot_id=new_snapshot_id())
    hosts = {h["host"]: h for h in list_hosts(xapi.port)}
    # The old master comes back as a slave of host 2 (become_another_masters_slave).
    set_pool(xapi.port, master=2, down=[])
    take_allowing_one_retry(d, "ha02")
    assert d.session.master_url == f"http://127.0.0.1:{hosts[2]['port']}"


def test_an_unreachable_master_address_is_tried_through_the_address_we_already_use(
    xapi: Xapi,
) -> None:
    """The master's Host.address is one this worker cannot reach (its management IP
    behind NAT). The driver reached it through the configured URL; after a failover to the
    member and back, the member's HOST_IS_SLAVE names that unreachable address, and the
    driver reaches the master again through the configured URL."""
    hosts = {h["host"]: h for h in list_hosts(xapi.port)}
    set_host_address(xapi.port, 1, f"127.0.0.2:{hosts[1]['port']}")  # refused: nothing there
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "nat01", [4 * MIB], shared=True)
    d.take(volume=volume("nat01"), snapshot_id=new_snapshot_id())
    set_pool(xapi.port, master=2, down=[1])
    take_allowing_one_retry(d, "nat01")
    assert d.session.master_url == f"http://127.0.0.1:{hosts[2]['port']}"
    set_pool(hosts[2]["port"], master=1, down=[])  # designated back: host 2 is a slave
    take_allowing_one_retry(d, "nat01")
    assert d.session.master_url == f"http://127.0.0.1:{hosts[1]['port']}"


def test_a_redirect_to_an_unreachable_host_address_goes_where_that_host_answered(
    xapi: Xapi,
) -> None:
    """An export of a VDI on host 1's local SR, asked of host 2 (the master now), is a 302
    to host 1's Host.address (``Importexport.return_302_redirect``), which this worker
    cannot reach; host 1 answered at the configured URL when it was the master."""
    hosts = {h["host"]: h for h in list_hosts(xapi.port)}
    set_host_address(xapi.port, 1, f"127.0.0.2:{hosts[1]['port']}")
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "nat02", [4 * MIB])  # on host 1's local SR
    guest_write(xapi.port, "nat02", 0, b"local")
    d.take(volume=volume("nat02"), snapshot_id=new_snapshot_id())
    set_pool(xapi.port, master=2, down=[])
    snap = take_allowing_one_retry(d, "nat02")
    assert d.session.master_url == f"http://127.0.0.1:{hosts[2]['port']}"
    image, _ = read_all(d.open_reader(snap, BackupPlan()))
    assert image[:5] == b"local"


def test_no_reachable_member_is_a_clear_unavailable(xapi: Xapi) -> None:
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "ha03", [4 * MIB], shared=True)
    d.take(volume=volume("ha03"), snapshot_id=new_snapshot_id())
    set_pool(xapi.port, master=1, down=[1, 2])
    with pytest.raises(HypervisorUnavailable):
        d.take(volume=volume("ha03"), snapshot_id=new_snapshot_id())
    with pytest.raises(HypervisorUnavailable, match="no pool member answers"):
        d.take(volume=volume("ha03"), snapshot_id=new_snapshot_id())


def during_a_failover(port: int, method: str, run: Callable[[], Any]) -> BaseException | None:
    """``run()`` while ``method``'s task is pending on host 1 (2 s) and HA promotes host 2:
    host 2 never heard of the task (tasks are ``PersistNothing``, ``datamodel.ml``
    l.628-633) and answers HANDLE_INVALID for it. What ``run`` raised, once the operation
    the old master started has ended (its write reached the new master's database)."""
    set_task_delay(port, 2.0, method)
    out: dict[str, BaseException] = {}

    def body() -> None:
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    time.sleep(0.8)
    set_pool(port, master=2, down=[1])
    thread.join(60)
    time.sleep(2.0)
    return out.get("error")


def test_a_take_whose_task_a_failover_lost_is_retried_and_finds_its_snapshot(
    xapi: Xapi,
) -> None:
    """The new master answers HANDLE_INVALID for the old master's task: its outcome is
    unknown (retryable), the source keeps the take's mark, and the retry adopts the
    snapshot the task made instead of taking a second one."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "ha09", [4 * MIB], shared=True)
    d.take(volume=volume("ha09"), snapshot_id=new_snapshot_id())
    member = next(h for h in list_hosts(xapi.port) if not h["master"])
    sid = new_snapshot_id()
    error = during_a_failover(
        xapi.port, "VDI.snapshot", lambda: d.take(volume=volume("ha09"), snapshot_id=sid)
    )
    assert isinstance(error, HypervisorUnavailable), error
    set_task_delay(member["port"], 0.0, "VDI.snapshot")
    d.take(volume=volume("ha09"), snapshot_id=sid)
    snaps = [v for v in list_vdis(member["port"]) if v["is_a_snapshot"]]
    assert len(snaps) == 2, snaps
    assert all(v["name"].startswith("snapferry-") for v in snaps), snaps
    assert f"snapferry-{sid}" in {v["name"] for v in snaps}


def test_a_checkpoint_whose_task_a_failover_lost_is_retried_and_finds_it(xapi: Xapi) -> None:
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "ha10", [4 * MIB], shared=True)
    member = next(h for h in list_hosts(xapi.port) if not h["master"])
    op = VmSnapshotOperation(
        snapshot_id=new_snapshot_id(),
        vm=VmRef(name="ha10", host="xen-host", hypervisor="xenserver"),
        type=VmSnapshotType.DISK_AND_MEMORY,
    )
    d.take_vm_snapshot(op)  # the driver knows the pool's members
    op = op.model_copy(update={"snapshot_id": new_snapshot_id()})
    error = during_a_failover(xapi.port, "VM.checkpoint", lambda: d.take_vm_snapshot(op))
    assert isinstance(error, HypervisorUnavailable), error
    set_task_delay(member["port"], 0.0, "VM.checkpoint")
    d.take_vm_snapshot(op)
    labels = [v["name"] for v in list_vms(member["port"]) if v.get("is_a_snapshot")]
    assert labels.count(f"snapferry-vm-{op.snapshot_id}") == 1, labels
