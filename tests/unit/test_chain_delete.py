"""Chain-aware deletes on the secondary store: a base a running delta has chosen is kept,
and hidden backups that nothing needs any more are purged, even after an interrupted delete."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from snapferry.activities.contracts import BackupPlan, VmRef, VolumeRef, new_snapshot_id
from snapferry.activities.storage.secondary import Manifest, SecondaryStore

VOLUME = VolumeRef(vm=VmRef(name="xen01", host="h1", hypervisor="xenserver"), disk="xvda")


def backed_up(store: SecondaryStore, parent: str | None = None) -> str:
    """A finished backup as the store sees one: image, digests and manifest (written last)."""
    sid = new_snapshot_id()
    d = store.directory(VOLUME)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{sid}.raw").write_bytes(b"\0" * 512)
    (d / f"{sid}.chunks").write_text("")
    manifest = Manifest(
        snapshot_id=sid,
        vm="xen01",
        disk="xvda",
        hypervisor="xenserver",
        virtual_size=512,
        chunk_size=512,
        chunks=1,
        checksum="sha256-chain:512:00",
        path=str(d / f"{sid}.raw"),
        chunks_file=str(d / f"{sid}.chunks"),
        source="vdi",
        source_format="vhd",
        parent=parent,
        depth=0 if parent is None else 1,
        created=datetime.now(UTC),
    )
    store.manifest_path(VOLUME, sid).write_text(manifest.model_dump_json())
    return sid


def files(store: SecondaryStore) -> list[str]:
    return sorted(p.name for p in store.directory(VOLUME).iterdir())


def test_a_base_a_running_delta_chose_is_hidden_not_deleted(tmp_path: Path) -> None:
    store = SecondaryStore(tmp_path)
    base = backed_up(store)
    running = new_snapshot_id()
    store.save_plan(VOLUME, running, BackupPlan(parent=base, base_image="vdi", depth=1))
    assert store.delete_chain_aware(VOLUME, base).hidden
    assert store.manifest_path(VOLUME, base).exists()
    # The running delta is cancelled (its partial files and plan go): the base goes with it.
    store.discard_everything(VOLUME, running)
    assert store.delete_chain_aware(VOLUME, running).purged == [base]
    assert files(store) == []


def test_an_interrupted_purge_is_finished_by_the_next_delete(tmp_path: Path) -> None:
    store = SecondaryStore(tmp_path)
    full = backed_up(store)
    delta = backed_up(store, parent=full)
    other = backed_up(store)
    assert store.delete_chain_aware(VOLUME, full).hidden
    # An attempt that deleted the delta's files and crashed before purging the full:
    store.discard_everything(VOLUME, delta)
    outcome = store.delete_chain_aware(VOLUME, delta)  # the retry
    assert outcome.purged == [full] and not outcome.hidden
    assert store.delete_chain_aware(VOLUME, other).purged == []
    assert files(store) == []
