"""The documentation: the site builds without a warning, the CLI reference is what the
parser says, the README's links resolve, and neither holds development history."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict``: a broken link, a missing anchor or a page outside the nav
    fails the build."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert (tmp_path / "index.html").exists()
    assert (tmp_path / "reference" / "cli" / "index.html").exists()


def test_the_cli_reference_is_what_the_parser_generates() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/cli_reference.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (
        "docs/reference/cli.md differs from the parser: run"
        " .venv/bin/python scripts/cli_reference.py and commit it\n" + done.stdout + done.stderr
    )


def test_the_cli_reference_names_every_command_and_option() -> None:
    """Spot checks against the parser itself, so a generator that dropped sections fails."""
    from snapferry.workers.cli import build_parser

    text = (DOCS / "reference" / "cli.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, child in sub.choices.items():  # type: ignore[attr-defined]
        assert f"snapferry {name}" in text
        for action in child._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in text, f"snapferry {name} {option}"


def test_the_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    assert "make run" in readme and "make test" in readme
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to a missing {target}"


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every ``snapferry ...`` line in a code block of the README and the
    docs (the generated reference aside): optional parts in ``[...]`` are kept, the first of
    ``a|b`` alternatives is taken, and a shell comment, pipe or ``&&`` ends the command."""
    found = []
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        if path == DOCS / "reference" / "cli.md":
            continue
        in_code = False
        text = path.read_text().replace("\\\n", " ")
        for number, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            match = re.search(r"(?:^|[\s/])snapferry\s+([a-z].*)", line) if in_code else None
            if match:
                command = re.split(r"\s#|\s\|\s|&&", match.group(1))[0]
                command = command.replace("[", " ").replace("]", " ").replace("…", "x")
                command = re.sub(r"(\S+?)\|\S+", r"\1", command)
                found.append((f"{path.relative_to(ROOT)}:{number}", shlex.split(command)))
    return found


def test_every_documented_command_parses_with_the_real_cli() -> None:
    """A command the docs show that the parser no longer takes (a renamed command or
    option) fails here; a placeholder for a number (``--limit N``) is accepted."""
    from snapferry.workers.cli import build_parser

    parser = build_parser()
    commands = documented_commands()
    assert len(commands) > 50
    failed = []
    for where, argv in commands:
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(argv)
        except SystemExit as exc:
            message = (errors.getvalue().strip().splitlines() or [str(exc)])[-1]
            if exc.code and not re.search(r"invalid (int|float) value: '[A-Z]+'", message):
                failed.append(f"{where}: snapferry {' '.join(argv)}: {message}")
    assert not failed, "\n".join(failed)


# The story of a change: issue and item numbers, review rounds, sessions, "this change",
# what a review found, a regression and its fix. Words of the product's own ("a backup's
# round", "the repository's writer session") are not matched.
HISTORY = re.compile(
    r"\bissues? #?\d+|\bitem \d+\b|\bround[- ]\d\b|\bthis (change|commit|PR)\b|\bpull request\b"
    r"|\b(the|outside|a|an independent) review\b|\breview(er)?'s\b|\breview (finding|comment)s?\b"
    r"|\b(previous|earlier|last) session\b|\bregression\b|\b(before|after) the fix\b"
    r"|\bDESIGN\.md\b",
    re.IGNORECASE,
)


def history_in(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def test_no_development_history_in_the_readme_or_the_docs() -> None:
    """Issue numbers and the story of a change belong in commit messages."""
    found = history_in([ROOT / "README.md", *sorted(DOCS.rglob("*.md"))])
    assert not found, "\n".join(found)


def test_no_development_history_in_code_comments_or_test_names() -> None:
    """The same in the code (comments, docstrings, test names), the deployment files and
    the build's own files."""
    paths = [ROOT / name for name in ("Makefile", "mkdocs.yml", "pyproject.toml")]
    for top in ("activities", "workers", "workflows", "tests", "bench", "scripts"):
        paths += sorted((ROOT / top).rglob("*.py"))
    paths += sorted(p for p in (ROOT / "scripts").rglob("*") if p.is_file() and p.suffix != ".pyc")
    paths += sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())
    found = history_in(sorted({p for p in paths if p != Path(__file__)}))
    assert not found, "\n".join(found)
