"""vCenter sessions that expire under the driver, against tests/vsphere_sim through the
driver's own calls (no Temporal): a backup that streams for several session lifetimes
finishes in one attempt; a session lost while a clone runs costs no second clone; and a
login that replaces a session logs the old one out, so that one driver never holds more
than one live session, however many readers renew at once.

The simulator expires a session a set time after its last *SOAP* call, whatever
``/folder`` traffic it carries (the worst case: nothing documents that datastore transfers
keep a session alive, and virt-v2v renews its cookie because "VMware authentication
expires after 30 minutes", input/vCenter.ml)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from snapferry.activities.contracts import BackupPlan, new_snapshot_id
from snapferry.activities.errors import CredentialsRejected
from snapferry.activities.hypervisors.vmware import DatastoreReader, VmwareDriver
from snapferry.activities.storage.copy_engine import CopyEngine
from snapferry.activities.storage.secondary import SecondaryStore
from tests.vsphere_sim.control import (
    create_vm,
    expire_sessions,
    list_tasks,
    session_stats,
    set_session_timeout,
    set_task_delay,
    soap_calls,
)

from .test_vmware_clones import volume
from .test_vmware_disk_copy import MIB, Sim, read_all, sim
from .test_vmware_placement import write_disk

__all__ = ["sim"]

pytestmark = pytest.mark.integration

LIFETIME = 0.6  # seconds a session lives after its last SOAP call


def test_a_transfer_of_several_session_lifetimes_finishes_in_one_attempt(sim: Sim) -> None:
    """Two backups of two clones stream side by side through one driver, at a rate that
    makes each last more than five session lifetimes, one ranged GET per MiB (so each GET
    after the first lifetime meets an expired session). Each copy completes in its one
    attempt, byte for byte; the renewals replace one session at a time, so the driver
    never holds two live sessions, and each replaced session was logged out or had
    expired."""
    size = 8 * MIB
    for name, seed in (("ss01", 90), ("ss02", 91)):
        create_vm(sim.port, name, [size])
        write_disk(sim, name, 0, seed)
    taker = VmwareDriver(sim.settings)
    primaries = {
        name: taker.take(volume=volume(name, name), snapshot_id=new_snapshot_id())
        for name in ("ss01", "ss02")
    }
    taker.session.close()
    set_session_timeout(sim.port, LIFETIME)
    session_stats(sim.port, reset=True)

    backup = VmwareDriver(sim.settings)  # a backup worker's driver: one session, shared
    store = SecondaryStore(sim.root.parent / "secondary")
    engine = CopyEngine(chunk_size=MIB, rate_limit_bps=size / (5.5 * LIFETIME))
    errors: list[BaseException] = []
    outcomes: dict[str, bytes] = {}

    def copy(name: str) -> None:
        primary = primaries[name]
        ds, _, path = primary.image.partition("] ")
        reader = DatastoreReader(backup.session, ds.lstrip("["), path, size, window=MIB)
        vol = volume(name, name)
        target = store.target(vol, "s1")
        try:
            engine.copy(reader, target)
            outcomes[name] = target.data.read_bytes()
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            errors.append(exc)
        finally:
            reader.close()

    started = time.monotonic()
    threads = [threading.Thread(target=copy, args=(n,)) for n in primaries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    spent = time.monotonic() - started
    assert not errors, errors
    assert spent > 5 * LIFETIME, spent
    for name in ("ss01", "ss02"):
        reader = taker.open_reader(primaries[name], BackupPlan())
        assert outcomes[name] == read_all(reader, MIB)
        reader.close()
    stats = session_stats(sim.port)
    assert stats["logins"] >= 3, stats  # it did outlive several sessions
    assert stats["max_live"] == 1, stats
    print(f"\nsessions over {spent:.1f} s: {stats}")


def test_a_session_lost_while_the_clone_runs_costs_no_second_clone(sim: Sim) -> None:
    """vCenter drops every session (a vpxd restart, an administrator's
    TerminateSession) while the take's clone runs. The take logs in again, goes on
    polling the same task through the objects it holds, and answers; one CloneVM_Task,
    one snapshot, and the replaced session is not left live."""
    create_vm(sim.port, "ss03", [4 * MIB])
    data = write_disk(sim, "ss03", 0, 92)
    set_task_delay(sim.port, 2.0, "CloneVM_Task")
    driver = VmwareDriver(sim.settings)
    sid = new_snapshot_id()
    result: list[object] = []

    def take() -> None:
        try:
            result.append(driver.take(volume=volume("ss03", "ss03"), snapshot_id=sid))
        except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
            result.append(exc)

    thread = threading.Thread(target=take)
    thread.start()
    for _ in range(200):
        if any(t["descriptionId"] == "VirtualMachine.clone" for t in list_tasks(sim.port)):
            break
        time.sleep(0.02)
    session_stats(sim.port, reset=True)
    expire_sessions(sim.port)
    thread.join(timeout=60)
    (primary,) = result
    assert not isinstance(primary, BaseException), primary
    calls = soap_calls(sim.port)
    assert calls.get("CloneVM_Task") == 1 and calls.get("CreateSnapshot_Task") == 1, calls
    reader = driver.open_reader(primary, BackupPlan())
    assert read_all(reader, MIB) == data
    reader.close()
    stats = session_stats(sim.port)
    assert stats["logins"] == 1 and stats["max_live"] == 1, stats


def test_rejected_credentials_at_a_renewal_are_permanent(sim: Sim) -> None:
    """The password changed while the session lived: the renewal's login is refused, and
    the read says so (CredentialsRejected, non-retryable) instead of retrying."""
    create_vm(sim.port, "ss04", [2 * MIB])
    driver = VmwareDriver(sim.settings)
    primary = driver.take(volume=volume("ss04", "ss04"), snapshot_id=new_snapshot_id())
    vcenter = sim.settings.vcenter
    assert vcenter is not None and vcenter.password_file is not None
    Path(vcenter.password_file).write_text("not it any more")  # read at each login
    expire_sessions(sim.port)
    reader = driver.open_reader(primary, BackupPlan())
    with pytest.raises(CredentialsRejected) as caught:
        read_all(reader, MIB)
    reader.close()
    assert caught.value.non_retryable
