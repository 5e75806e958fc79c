"""The vSphere simulator's own self-check, so a change to the simulator that breaks what
the VMware tests rely on (SOAP, faults, datastore HTTP, snapshot semantics) fails by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_vsphere_simulator_selfcheck() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.vsphere_sim.selfcheck"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("selfcheck passed")
    assert "FAIL" not in proc.stdout
