"""The documentation: the site builds without a warning, the CLI reference is what the
parser says, the README's links resolve, and neither holds development history."""

from __future__ import annotations

import os
import re
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


HISTORY = re.compile(
    r"\bissues? #?\d+|\bround[- ]2\b|\bthis change\b|\bthe review\b|\bDESIGN\.md\b",
    re.IGNORECASE,
)


def test_no_development_history_in_the_readme_or_the_docs() -> None:
    """Issue numbers and the story of a change belong in commit messages."""
    found = []
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


CODE_HISTORY = re.compile(
    r"\bissues? #?\d+|\bround[- ]2\b|\bthis change\b|\b(the|outside|a) review\b|review's",
    re.IGNORECASE,
)


def test_no_development_history_in_code_comments_or_test_names() -> None:
    found = []
    for top in ("activities", "workers", "workflows", "tests", "bench", "scripts"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path == Path(__file__):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if CODE_HISTORY.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
