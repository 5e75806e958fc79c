"""snapferry's own metrics, recorded from the workflows through the SDK's replay-safe meter
(exported by a worker started with ``--metrics-address``; see ``workers/metrics.py``).

Names (Prometheus, counters with ``_total``), each labelled ``hypervisor``:
``snapferry_backups_started``, ``_completed``, ``_failed``; ``snapferry_backup_bytes_copied``
and ``_stored``; ``snapferry_backup_resumes`` (a backup that went on from a checkpoint after
a crash or retry); ``snapferry_alerts_raised`` (by event); histograms
``snapferry_answer_latency_seconds`` (start to the caller's answer) and
``snapferry_backup_duration_seconds`` (BackingUp to BackedUp).
"""

from __future__ import annotations

from temporalio import workflow

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]
DURATION_BUCKETS_S = [1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 7 * 86400]


def count(name: str, value: int = 1, **labels: str) -> None:
    if value > 0:
        workflow.metric_meter().create_counter(f"snapferry_{name}").add(
            value, additional_attributes=dict(labels)
        )


def observe(name: str, seconds: float, **labels: str) -> None:
    workflow.metric_meter().create_histogram_float(f"snapferry_{name}", unit="s").record(
        max(seconds, 0.0), additional_attributes=dict(labels)
    )
