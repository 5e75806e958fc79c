"""Writes docs/reference/cli.md, the CLI reference, from the ``snapferry`` argparse parser.

Every command and subcommand gets a section with its description, its usage line and a
table of its arguments and options (help text, choices, default). The output depends on the
parser only: machine-dependent defaults (``--host``, which is ``$SNAPFERRY_HOST`` or the
short host name) are written as what they mean, and the usage lines are wrapped at a fixed
width. ``tests/unit/test_docs.py`` fails when the committed file differs from what this
script generates.

    .venv/bin/python scripts/cli_reference.py          # rewrite docs/reference/cli.md
    .venv/bin/python scripts/cli_reference.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "reference" / "cli.md"
WIDTH = "100"
HOST_SENTINEL = "@SNAPFERRY_HOST@"
HOST_DEFAULT = "`$SNAPFERRY_HOST`, else this machine's short host name"

HEADER = """\
# CLI reference

Generated from the `snapferry` command's parser by `scripts/cli_reference.py`; do not edit
by hand. `tests/unit/test_docs.py` fails when this page differs from the parser.

Every command exits 0 when done, 1 when refused or failed (the reason on stderr), 2 on bad
usage and 130 when interrupted. Configuration comes from `SNAPFERRY_*` environment variables
(see [Configuration](../operating/configuration.md)). For the commands by task, see
[Operating](../operating/index.md).
"""


def _parser() -> argparse.ArgumentParser:
    """The real parser, built where nothing of this machine leaks into its defaults."""
    for name in [n for n in os.environ if n.startswith("SNAPFERRY_")]:
        del os.environ[name]
    os.environ["SNAPFERRY_HOST"] = HOST_SENTINEL
    os.environ["COLUMNS"] = WIDTH  # argparse wraps usage lines at the terminal's width
    sys.path.insert(0, str(ROOT))
    from snapferry.workers.cli import build_parser

    return build_parser()


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    value = action.default
    if action.required or value in (None, False, argparse.SUPPRESS) or value == []:
        return ""
    if value == HOST_SENTINEL:
        return HOST_DEFAULT
    return f"`{value}`"


def _name(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    if action.nargs == 0:
        return ", ".join(f"`{s}`" for s in action.option_strings)
    metavar = action.metavar or action.dest.upper()
    return ", ".join(f"`{s} {metavar}`" for s in action.option_strings)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = argparse.HelpFormatter(parser.prog)._expand_help(action) if action.help else ""
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        text += " (one of: " + ", ".join(f"`{c}`" for c in action.choices) + ")"
    if action.required and action.option_strings:
        text += " (required)"
    return _cell(text)


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage line without its ``usage:`` prefix, continuation lines shifted with it."""
    prefix = "usage: "
    lines = parser.format_usage().rstrip().split("\n")
    lines = [lines[0].removeprefix(prefix)] + [ln[len(prefix) :] for ln in lines[1:]]
    return "\n".join(lines)


def _section(
    parser: argparse.ArgumentParser, path: list[str], out: list[str], summary: str = ""
) -> None:
    commands: list[tuple[str, argparse.ArgumentParser, str]] = []
    rows: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            commands = [(n, p, helps.get(n, "")) for n, p in action.choices.items()]
        elif not isinstance(action, argparse._HelpAction):
            rows.append(f"| {_name(action)} | {_help(parser, action)} | {_default(action)} |")
    title = " ".join(path)
    out.append(f"{'#' * min(len(path) + 1, 4)} {title}\n")
    if parser.description or summary:
        out.append(_cell(parser.description or summary) + "\n")
    out.append(f"```text\n{_usage(parser)}\n```\n")
    if rows:
        out.append("| argument | meaning | default |\n|---|---|---|")
        out.extend(rows)
        out.append("")
    if commands:
        out.append("| command | what it does |\n|---|---|")
        for name, _, help_ in commands:
            anchor = "-".join([*path, name])
            out.append(f"| [`{title} {name}`](#{anchor}) | {_cell(help_)} |")
        out.append("")
    for name, child, help_ in commands:
        _section(child, [*path, name], out, help_)


def generate() -> str:
    parser = _parser()
    out = [HEADER]
    _section(parser, [parser.prog], out)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = ap.parse_args(argv)
    text = generate()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run scripts/cli_reference.py")
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
