"""The CLI explains itself: every option has help, defaults are shown,
exit codes are documented, and libvirt's default handler prints nothing raw."""

from __future__ import annotations

import argparse
import subprocess
import sys

from snapferry.workers.cli import build_parser, web_ui_link


def every_action(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from every_action(child, (*path, name))
        elif action.dest != "help":
            yield path, parser, action


def test_every_option_of_every_command_has_help() -> None:
    missing = [
        f"{' '.join(path)} {action.option_strings or action.dest}"
        for path, _parser, action in every_action(build_parser())
        if not action.help
    ]
    assert missing == []


def test_help_shows_defaults_and_exit_codes() -> None:
    parser = build_parser()
    seen = 0
    for _path, sub, action in every_action(parser):
        if action.default not in (None, False) and not action.required and action.help:
            assert "(default: " in sub.format_help(), sub.prog
            seen += 1
    assert seen > 10
    assert "exit codes: 0 done; 1 refused or failed" in parser.format_help()


def test_the_web_ui_link_names_the_workflow(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from snapferry.activities.settings import Settings

    settings = Settings.from_env()
    monkeypatch.delenv("SNAPFERRY_UI_URL", raising=False)
    assert web_ui_link(settings, "volume-snapshot-x") == (
        f"http://127.0.0.1:{settings.ui_port}/namespaces/{settings.namespace}"
        "/workflows/volume-snapshot-x"
    )
    monkeypatch.setenv("SNAPFERRY_UI_URL", "https://temporal.example/")
    assert web_ui_link(settings, "w").startswith("https://temporal.example/namespaces/")


def test_no_raw_libvirt_error_line_reaches_stderr() -> None:
    """Looking up a missing domain through the driver gives a typed error and no
    "libvirt: QEMU Driver error : ..." line from libvirt's default handler."""
    code = (
        "from activities.settings import Settings\n"
        "from activities.hypervisors.kvm import KvmDriver\n"
        "from activities.errors import VmNotFound\n"
        "d = KvmDriver(Settings.from_env())\n"
        "try:\n"
        "    d._domain('sf-no-such-domain')\n"
        "except VmNotFound as e:\n"
        "    print('typed:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "typed: VM 'sf-no-such-domain' does not exist" in proc.stdout
    assert "libvirt:" not in proc.stderr and proc.stderr.strip() == ""


def test_the_demo_does_not_import_the_cli() -> None:
    """The CLI is split by command group (workers/cli/), and the demo uses the progress bar
    module, not the CLI: no import circle between them."""
    code = (
        "import sys, snapferry.workers.demo\n"
        "print([m for m in sys.modules if m == 'snapferry.workers.cli'"
        " or m.startswith('snapferry.workers.cli.')])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_demo_prints_no_raw_libvirt_line_either() -> None:
    """``make run`` once printed "libvirt: QEMU Driver error : Domain not found" when the
    demo looked up its VM before creating it: the demo's libvirt calls are quiet too."""
    code = (
        "import libvirt, snapferry.workers.demo_vm\n"
        "conn = libvirt.open('qemu:///system')\n"
        "try:\n"
        "    conn.lookupByName('sf-no-such-domain')\n"
        "except libvirt.libvirtError:\n"
        "    print('refused')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "refused", proc.stderr
    assert proc.stderr.strip() == ""
