"""Prometheus metrics of a worker process: the Temporal SDK's own, plus snapferry's.

One endpoint per process, served by the SDK's runtime (``temporalio.runtime`` telemetry with
a Prometheus bind address), so snapferry's metrics need no second HTTP server: workflows and
activities record them through the SDK's metric meter (``workflow.metric_meter()`` is
replay-safe: nothing is counted twice when a worker replays a history). Off by default; when
on, loopback unless an address says otherwise, since the endpoint has no authentication.
"""

from __future__ import annotations

import ipaddress

from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from snapferry.workflows.metrics import DURATION_BUCKETS_S, LATENCY_BUCKETS_S


def parse_metrics_address(address: str) -> str:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT``; a bare port binds 127.0.0.1."""
    if address.isdigit():
        address = f"127.0.0.1:{address}"
    host, _, port = address.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        if not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{address!r} is not a metrics address: use PORT or IP:PORT (e.g. 127.0.0.1:9464)"
        ) from None
    return address


def metrics_runtime(address: str) -> Runtime:
    return Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(
                bind_address=parse_metrics_address(address),
                counters_total_suffix=True,
                durations_as_seconds=True,
                histogram_bucket_overrides={
                    "snapferry_answer_latency_seconds": LATENCY_BUCKETS_S,
                    "snapferry_backup_duration_seconds": DURATION_BUCKETS_S,
                },
            )
        )
    )
