"""Bad input a new user might type is refused by the CLI before it talks to Temporal at all:
the refusal names the option and what is wrong with it, and nothing is started."""

from __future__ import annotations

import pytest

from snapferry.workers.cli import run

# Nothing listens here: a command that got as far as connecting would fail differently.
NOWHERE = "127.0.0.1:9"


@pytest.fixture(autouse=True)
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPFERRY_TEMPORAL_ADDRESS", NOWHERE)


CASES = {
    "snapshot-list-vm": (
        ["snapshot", "list", "--vm", "../../x"],
        "vm: '../../x' is not a valid name",
    ),
    "snapshot-list-disk": (
        ["snapshot", "list", "--vm", "web01", "--disk", 'vda" OR VmId != "'],
        "disk: 'vda\" OR VmId != \"' is not a valid name",
    ),
    "snapshot-list-stuck-vm": (
        ["snapshot", "list", "--stuck", "1h", "--vm", "a/b"],
        "vm: 'a/b' is not a valid name",
    ),
    "snapshot-list-empty-vm": (["snapshot", "list", "--vm", ""], "vm: '' is not a valid name"),
    "vm-snapshot-list-vm": (
        ["vm-snapshot", "list", "--vm", "../x"],
        "vm: '../x' is not a valid name",
    ),
    "backup-retry-policy": (
        ["backup", "retry", "--all-failed", "--policy", "p/../q"],
        "policy: 'p/../q' is not a valid name",
    ),
    "vm-moved-vm": (
        ["vm", "moved", "--vm", "../x", "--host", "h2"],
        "vm: '../x' is not a valid name",
    ),
    "policy-create-empty-id": (
        ["policy", "create", "--vm", "web01", "--disk", "vda", "--interval", "daily", "--id", ""],
        "policy_id: '' is not a valid name",
    ),
    "policy-delete-id": (["policy", "delete", "../x"], "policy: '../x' is not a valid name"),
    "policy-run-now-id": (["policy", "run-now", "a b"], "policy: 'a b' is not a valid name"),
    "snapshot-create-empty-id": (
        ["snapshot", "create", "--vm", "web01", "--disk", "vda", "--id", ""],
        "snapshot_id: '' is not a snapshot ID",
    ),
    "vm-snapshot-create-empty-id": (
        ["vm-snapshot", "create", "--vm", "web01", "--id", ""],
        "snapshot_id: '' is not a snapshot ID",
    ),
}


@pytest.mark.parametrize("argv,expected", CASES.values(), ids=CASES.keys())
def test_bad_input_is_refused_naming_it_before_anything_starts(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("snapferry: error: invalid input: "), err
    assert expected in err
    assert NOWHERE not in err and "connect" not in err.lower()


QUIESCE_CASES = {
    "snapshot-create": ["snapshot", "create", "--vm", "web01", "--disk", "vda"],
    "vm-snapshot-create": ["vm-snapshot", "create", "--vm", "web01"],
    "policy-create": ["policy", "create", "--vm", "web01", "--disk", "vda", "--interval", "daily"],
}


@pytest.mark.parametrize("argv", QUIESCE_CASES.values(), ids=QUIESCE_CASES.keys())
def test_an_unknown_quiesce_value_is_refused_naming_the_choices(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run([*argv, "--quiesce=maybe"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--quiesce: invalid choice: 'maybe'" in err and "'no', 'yes', 'try'" in err


@pytest.mark.parametrize("command", [["snapshot", "create"], ["policy", "create"]])
def test_a_boot_check_of_a_vm_on_another_hypervisor_is_refused_when_asked(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*command, "--vm", "web01", "--disk", "disk-1", "--hypervisor", "vmware"]
    argv += ["--check-boot"] + (["--interval", "daily"] if command[0] == "policy" else [])
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert "boot checks run on KVM hosts; vmware has none" in err
    assert NOWHERE not in err and "connect" not in err.lower()
