"""deploy/prometheus: the scrape config and alert rules, checked by Prometheus's own tool,
and every metric a rule names is one the code records."""

from __future__ import annotations

import re
import subprocess

from .deploy_files import (
    DEPLOY,
    ROOT,
)

# -- Prometheus: the scrape config and alert rules, checked by Prometheus's own tool ---------
PROMETHEUS = DEPLOY / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )


def test_prometheus_config_and_rules_are_valid() -> None:
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = promtool("check", "rules", "snapferry-rules.yml")
    assert rules.returncode == 0 and "3 rules found" in rules.stdout, rules.stdout + rules.stderr


def test_alert_rules_fire_when_they_should_and_only_then() -> None:
    tested = promtool("test", "rules", "snapferry-rules.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_alert_rules_use_metrics_the_code_exports() -> None:
    """Every snapferry_* metric a rule names is one the workflows or activities record."""

    rules = (PROMETHEUS / "snapferry-rules.yml").read_text()
    source = "".join(p.read_text() for p in (ROOT / "workflows").glob("*.py")) + "".join(
        p.read_text() for p in (ROOT / "activities").glob("*.py")
    )
    for name in set(re.findall(r"snapferry_[a-z_]+", rules)):
        base = name.removesuffix("_total").removeprefix("snapferry_")
        assert f'"{base}"' in source or f'"snapferry_{base}"' in source, name
