"""Model-based test: random sequences of volume and VM snapshot operations on a real TCG domain.

A seeded generator drives guest writes, volume snapshots, VM snapshots of both types, waits
for backups, VM stop/start, reverts (of both kinds) and deletes (of both kinds), while a
model keeps the bytes the disk should hold and the bytes each snapshot captured. Backups are
throttled, so reverts and deletes regularly meet a backup still in flight.

After every revert the disk must equal the model; every BackedUp snapshot, full or delta
(KVM incrementals are on), must restore byte-identical to the disk at its snapshot time,
through its chain; after deletes no file is orphaned on primary or secondary (a deleted
backup that later deltas need stays, Hidden); at the end, with everything deleted, the VM is
back on its original file. Both kinds must reach 4 live levels, and deltas must occur. CI
runs one fixed seed; ``--model-examples N`` adds N more.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    SnapshotState,
    VmRef,
    VmSnapshotRequest,
    VmSnapshotState,
    VmSnapshotType,
    new_snapshot_id,
)
from snapferry.activities.hypervisors.domain_lock import domain_lock
from snapferry.activities.settings import Settings
from snapferry.activities.storage.secondary import SecondaryStore
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from snapferry.workflows.snapshot import DELETE_UPDATE, REVERT_UPDATE
from snapferry.workflows.vm_snapshot import DELETE_VM_SNAPSHOT_UPDATE, REVERT_VM_SNAPSHOT_UPDATE

from .helpers import chain_of, images_identical, request_for

pytestmark = pytest.mark.integration

SIZE = 16 * MIB
WRITE = 64 * 1024
CI_SEED = 20261125


def seeds(config: pytest.Config) -> list[int]:
    return [CI_SEED] + [CI_SEED + i for i in range(1, config.getoption("--model-examples") + 1)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        metafunc.parametrize("seed", seeds(metafunc.config))


def write_raw(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(bytes(data))
    return path


class Model:
    def __init__(self, reference: Path) -> None:
        self.disk = bytearray(reference.read_bytes())
        self.snapshots: dict[str, bytes] = {}  # live volume snapshot -> content at its time
        self.vm_snapshots: dict[str, tuple[bytes, VmSnapshotType]] = {}
        self.running = True
        self.max_live = 0
        self.max_vm_live = 0
        self.deleted: list[str] = []  # volume snapshots deleted (Destroyed, or Hidden)
        self.deltas: set[str] = set()  # snapshots whose backup was a delta


STEPS = 100
BACKUP_RATE = 16e6  # bytes/s: a 16 MiB disk's backup takes long enough to be met in flight


async def test_random_sequences_keep_every_snapshot_exact(
    seed: int,
    client: Client,
    settings: Settings,
    make_vm,
    host_name: str,
    libvirt_conn,
    tmp_path: Path,
) -> None:
    rng = random.Random(seed)
    vm = make_vm(size=SIZE, data_bytes=SIZE // 2, seed=seed)
    original = str(vm.disk)
    model = Model(vm.reference)
    dom = libvirt_conn.lookupByName(vm.name)
    store = settings.secondary / "snapshots" / vm.name / "vda"
    vm_ref = VmRef(name=vm.name, host=host_name)
    log: list[str] = []
    in_flight = 0  # operations that met a volume snapshot's backup still running

    def active() -> str:
        return dom.XMLDesc(0).split("<source file='")[1].split("'")[0]

    def observe(expected: bytes | None = None) -> tuple[str, list[str], bool]:
        """The active image, its chain, and whether it reads as ``expected``, seen under the
        host driver's domain lock: a release merging in the background (after a backup
        finished) must not change the chain between the reads."""
        with domain_lock(settings.lock_dir, vm.name, timeout_s=120):
            image = active()
            if expected is None:
                return image, chain_of(image), True
            reference = write_raw(tmp_path / "disk.raw", expected)
            return image, chain_of(image), images_identical(reference, image, fmt_b="qcow2")

    async def check_backups() -> None:
        for sid, content in model.snapshots.items():
            record = await starter.wait_settled(client, sid)
            assert record.state == SnapshotState.BACKED_UP and record.backup, (sid, log)
            if record.backup.parent is not None:
                model.deltas.add(sid)
            expected = write_raw(tmp_path / "expected.raw", content)
            manifest = SecondaryStore.read_manifest(Path(record.backup.manifest_path))
            with SecondaryStore.materialized(manifest) as restored:  # the full + each delta
                assert images_identical(expected, restored), (sid, record.backup, log)

    def check_disk() -> None:
        assert observe(model.disk)[2], " ".join(log)

    async def check_no_orphans() -> None:
        hidden = {
            sid
            for sid in model.deleted
            if (await starter.get_record(client, sid)).state == SnapshotState.HIDDEN
        }
        live = set(model.snapshots) | hidden
        on_secondary = {p.name.lstrip(".").split(".")[0] for p in store.glob("*")}
        assert on_secondary <= live, (sorted(p.name for p in store.glob("*")), live, " ".join(log))
        # On primary, every overlay (and marker) belongs to the disk's current chain: a
        # deleted snapshot's overlay is merged away, or waits in the chain, released; and
        # every memory file belongs to a live DiskAndMemory VM snapshot.
        with domain_lock(settings.lock_dir, vm.name, timeout_s=120):
            chain = set(chain_of(active()))
            files = list(Path(original).parent.glob(Path(original).name + ".snapferry-*"))
        for p in files:
            if p.suffix == ".mem":
                sid = p.name.split(".snapferry-")[1].removesuffix(".mem").removeprefix("vm-")
                assert sid in model.vm_snapshots, (p.name, log)
                continue
            layer = str(p).removesuffix(".released").removesuffix(".base").removesuffix(".vm")
            assert layer in chain, (p.name, log)

    async def stop() -> None:
        if model.running:
            dom.destroy()
            model.running = False

    async with running_workers(
        client,
        dataclasses.replace(settings, backup_rate_limit_bps=BACKUP_RATE),
        hosts=[host_name],
        backup=True,
        concurrency=2,
    ):
        for _step in range(STEPS):
            ops = ["write", "write", "snapshot", "snapshot", "vm-snapshot", "vm-snapshot"]
            ops += ["settle"] + (["stop"] if model.running else ["start"] * 3)
            ops += ["revert", "delete"] if model.snapshots else []
            ops += ["vm-revert", "vm-delete"] if model.vm_snapshots else []
            op = rng.choice(ops)
            if op in ("revert", "delete", "vm-revert", "vm-delete"):
                states = [(await starter.get_record(client, x)).state for x in model.snapshots]
                in_flight += states.count(SnapshotState.BACKING_UP) > 0
            if op == "write" and not model.running:
                op = "write(skipped: stopped)"
            elif op == "write":
                offset = rng.randrange(0, SIZE - WRITE, 4096)
                pattern = rng.randrange(1, 256)
                vm.guest_write(pattern=pattern, offset=offset, length=WRITE)
                model.disk[offset : offset + WRITE] = bytes([pattern]) * WRITE
            elif op == "snapshot":
                answer = await starter.create_snapshot(
                    client, request_for(vm.name, host_name, settings)
                )
                assert answer.state == SnapshotState.CREATED_ON_PRIMARY
                model.snapshots[answer.id] = bytes(model.disk)
                model.max_live = max(model.max_live, len(model.snapshots))
            elif op == "vm-snapshot":
                kind = rng.choice(list(VmSnapshotType)) if model.running else VmSnapshotType.DISK
                req = VmSnapshotRequest(snapshot_id=new_snapshot_id(), vm=vm_ref, type=kind)
                taken = await starter.create_vm_snapshot(client, req)
                assert taken.state == VmSnapshotState.READY, taken
                model.vm_snapshots[taken.id] = (bytes(model.disk), kind)
                model.max_vm_live = max(model.max_vm_live, len(model.vm_snapshots))
                op = f"vm-snapshot:{kind.value}"
            elif op == "settle":
                await check_backups()
            elif op == "stop":
                await stop()
            elif op == "start":
                dom.create()
                model.running = True
            elif op == "revert":
                sid = rng.choice(list(model.snapshots))
                await stop()
                await starter.snapshot_operation(client, sid, REVERT_UPDATE)
                model.disk = bytearray(model.snapshots[sid])
                check_disk()
            elif op == "vm-revert":
                sid = rng.choice(list(model.vm_snapshots))
                content, kind = model.vm_snapshots[sid]
                if kind == VmSnapshotType.DISK:
                    await stop()
                await starter.snapshot_operation(
                    client,
                    sid,
                    REVERT_VM_SNAPSHOT_UPDATE,
                    kind=starter.VM,
                    result_type=starter.VM.record_type,
                )
                model.disk = bytearray(content)
                # A memory snapshot resumes the VM; a disk snapshot leaves it stopped.
                model.running = kind == VmSnapshotType.DISK_AND_MEMORY
                assert bool(dom.isActive()) == model.running, log
                op = f"vm-revert:{kind.value}"
                check_disk()
            elif op == "delete":
                sid = rng.choice(list(model.snapshots))
                deleted = await starter.snapshot_operation(client, sid, DELETE_UPDATE)
                del model.snapshots[sid]
                model.deleted.append(sid)
                gone = await starter.get_record(client, sid)
                ended = (SnapshotState.DESTROYED, SnapshotState.HIDDEN)
                assert gone.state in ended, (gone.transitions, deleted, log)
                await check_no_orphans()
            elif op == "vm-delete":
                sid = rng.choice(list(model.vm_snapshots))
                await starter.snapshot_operation(
                    client,
                    sid,
                    DELETE_VM_SNAPSHOT_UPDATE,
                    kind=starter.VM,
                    result_type=starter.VM.record_type,
                )
                del model.vm_snapshots[sid]
                gone_vm = await starter.get_record(client, sid, starter.VM)
                assert gone_vm.state == VmSnapshotState.REMOVED, log
                await check_no_orphans()
            log.append(op)
            # Shown by pytest only when the test fails: the chain after every step.
            print(op, [Path(x).name[-20:] for x in observe()[1]], flush=True)

        await check_backups()
        check_disk()
        for sid in list(model.snapshots):
            await starter.snapshot_operation(client, sid, DELETE_UPDATE)
            del model.snapshots[sid]
            model.deleted.append(sid)
        for sid in list(model.vm_snapshots):
            await starter.snapshot_operation(
                client,
                sid,
                DELETE_VM_SNAPSHOT_UPDATE,
                kind=starter.VM,
                result_type=starter.VM.record_type,
            )
            del model.vm_snapshots[sid]
            await check_no_orphans()
        if not model.running:
            dom.create()
    # Everything released and deleted: back on the original file, nothing left anywhere
    # (the Hidden backups went with the delete of their last dependant).
    assert model.deltas, f"no backup was a delta: {' '.join(log)}"
    assert active() == original, log
    check_disk()
    assert not store.exists() or list(store.glob("*")) == []
    assert [p.name for p in Path(original).parent.glob(Path(original).name + ".snapferry-*")] == []
    print(
        f"\nseed {seed}: {len(log)} steps, up to {model.max_live} live volume snapshots and"
        f" {model.max_vm_live} live VM snapshots; {len(model.deltas)} delta backups;"
        f" {in_flight} reverts/deletes met a backup in"
        f" flight: {' '.join(log)}"
    )
    coverage = {
        "4 live volume snapshots": model.max_live >= 4,
        "4 live VM snapshots": model.max_vm_live >= 4,
        "reverts of both VM snapshot types": {op for op in log if op.startswith("vm-revert:")}
        == {f"vm-revert:{t.value}" for t in VmSnapshotType},
        "an operation meeting a backup in flight": in_flight > 0,
    }
    missing = [what for what, reached in coverage.items() if not reached]
    print(f"seed {seed} did not reach: {missing}" if missing else f"seed {seed}: full coverage")
    if seed == CI_SEED:  # the CI seed must show everything; extra seeds check data only
        assert not missing, f"the CI seed no longer reaches {missing}; pick another seed"
