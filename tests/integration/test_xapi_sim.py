"""The XAPI simulator's own self-check, so a change to the simulator that breaks what the
XenServer tests rely on (envelope, tasks, faults, VHD export/import) fails by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_xapi_simulator_selfcheck() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.xapi_sim.selfcheck"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ALL CHECKS PASSED" in proc.stdout
    assert not [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
