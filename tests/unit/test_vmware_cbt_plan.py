"""How the VMware driver plans a backup from Changed Block Tracking changeIds, and joins a
QueryChangedDiskAreas answer's areas: pure functions, no vCenter."""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

from snapferry.activities.contracts import PrimarySnapshot, new_snapshot_id
from snapferry.activities.hypervisors.vmware.cbt import CbtOps, merged
from snapferry.activities.settings import Settings

U1 = "52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b"
U2 = "52 aa aa aa aa aa aa aa-bb bb bb bb bb bb bb bb"


@dataclass
class Entry:
    snapshot_id: str
    change_id: str | None
    depth: int = 0
    source: str = "[ds1] x/x-flat.vmdk"
    virtual_size: int = 1 << 30


def source(change_id: str | None) -> PrimarySnapshot:
    return PrimarySnapshot(
        image="[ds1] c/c-flat.vmdk",
        image_format="raw",
        overlay="vm-snapferry-x",
        virtual_size=1 << 30,
        vm_was_running=True,
        change_id=change_id,
    )


def plan(change_id: str | None, history: list[Entry], delta_max: int | None = None):  # type: ignore[no-untyped-def]
    driver = SimpleNamespace(settings=replace(Settings.from_env(), delta_max=3))
    return CbtOps.plan_backup(driver, source(change_id), history, delta_max=delta_max)  # type: ignore[arg-type]


def test_a_delta_against_the_newest_backup_while_its_tracking_goes_on() -> None:
    older, newest = Entry(new_snapshot_id(), f"{U1}/2"), Entry(new_snapshot_id(), f"{U1}/5", 1)
    p = plan(f"{U1}/9", [older, newest])
    assert (p.parent, p.base_image, p.depth, p.reason) == (newest.snapshot_id, f"{U1}/5", 2, None)


def test_fulls_say_why() -> None:
    sid = new_snapshot_id()
    assert plan(f"{U1}/2", []).reason == "the volume's first backup"
    assert "was not on" in (plan(None, [Entry(sid, f"{U1}/1")]).reason or "")
    assert "no CBT changeId" in (plan(f"{U1}/2", [Entry(sid, None)]).reason or "")
    assert "reset" in (plan(f"{U2}/2", [Entry(sid, f"{U1}/1")]).reason or "")
    assert "went back" in (plan(f"{U1}/3", [Entry(sid, f"{U1}/3")]).reason or "")
    assert "delta max 3" in (plan(f"{U1}/9", [Entry(sid, f"{U1}/1", depth=3)]).reason or "")
    assert "delta max is 0" in (plan(f"{U1}/9", [Entry(sid, f"{U1}/1")], delta_max=0).reason or "")
    assert plan(f"{U1}/9", [Entry(sid, f"{U1}/1", depth=3)], delta_max=4).parent == sid


def test_areas_are_sorted_joined_and_kept_within_the_disk() -> None:
    answer = [(4096, 4096), (0, 512), (1 << 20, 100), (8192, 10), (512, 512), (2000, 3000)]
    assert merged(answer + [(1 << 30, 4096)], 1 << 30) == [(0, 1024), (2000, 6202), (1 << 20, 100)]
    assert merged([((1 << 30) - 512, 4096)], 1 << 30) == [((1 << 30) - 512, 512)]
    assert merged([], 1 << 30) == []


def test_a_disk_resized_since_the_newest_backup_gets_a_full() -> None:
    """An extension keeps the disk's tracking (same UUID, later sequence), but on older
    hosts that tracking misses changes after it ("some changed blocks might not be
    captured by a backup", VMware KB 2090639, whose workaround is a CBT reset): the plan is
    a full that names both sizes."""
    newest = Entry(new_snapshot_id(), f"{U1}/5", virtual_size=512 << 20)
    p = plan(f"{U1}/9", [newest])
    assert p.parent is None and p.base_image is None
    assert p.reason == (
        f"the disk was resized since the newest backup ({512 << 20} -> {1 << 30} bytes)"
    )
