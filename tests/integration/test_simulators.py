"""The simulators' own self-checks, so that a change to a simulator that breaks what the
VMware or XenServer tests rely on (envelope, tasks, faults, data endpoints) fails by name."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.simulator import REPO_ROOT

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("module", "passed"),
    [
        ("tests.vsphere_sim.selfcheck", "selfcheck passed"),
        ("tests.xapi_sim.selfcheck", "ALL CHECKS PASSED"),
    ],
)
def test_simulator_selfcheck(module: str, passed: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert passed in proc.stdout
    assert not [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
