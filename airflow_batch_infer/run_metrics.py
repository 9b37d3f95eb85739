"""The run report's figures as Airflow metrics (``Stats``), so that a StatsD or OpenTelemetry setup
(``[metrics] statsd_on`` / ``otel_on``) sees them. Names are under ``batch_infer.``; each carries the
``dag_id`` and ``table`` as tags (dropped by a plain StatsD backend, kept by Datadog and OpenTelemetry).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

PREFIX = "batch_infer"


def metric_values(figures: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """Metric name → (kind, value) for the figures that are known: ``incr`` for row counts, ``timing``
    for step wall times (seconds), ``gauge`` for the rest.

    :param figures: from :func:`airflow_batch_infer.report.run_figures`.
    """
    rows, server, latency = figures["rows"], figures["server"], figures["latency_ms"]
    values: dict[str, tuple[str, Any]] = {
        "rows_in": ("incr", rows["in"]),
        "rows_scored": ("incr", rows["scored"]),
        "rows_set_aside": ("incr", rows["set_aside"]),
        "rows_filtered": ("incr", rows["filtered"]),
        "rows_per_second": ("gauge", figures["rows_per_second"]),
        "latency_p50_ms": ("gauge", latency["p50"]),
        "latency_p95_ms": ("gauge", latency["p95"]),
        "latency_p99_ms": ("gauge", latency["p99"]),
        "server_queue_ms_per_request": ("gauge", server["queue_ms_per_request"]),
        "server_compute_ms_per_request": ("gauge", server["compute_ms_per_request"]),
        "average_batch_size": ("gauge", server["average_batch_size"]),
        "gpu_utilization": ("gauge", figures["gpu_utilization"]),
    }
    for step, seconds in figures["steps_seconds"].items():
        values[f"{step}_seconds"] = ("timing", seconds)
    return {
        f"{PREFIX}.{name}": (kind, float(value))
        for name, (kind, value) in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def emit_run_metrics(figures: dict[str, Any], tags: dict[str, str] | None = None) -> dict[str, float]:
    """Send the figures through Airflow's ``Stats``; returns what was sent (name → value).

    :param figures: from :func:`airflow_batch_infer.report.run_figures`.
    :param tags: e.g. ``{"dag_id": ..., "table": ...}``.
    """
    from airflow.sdk.observability import stats

    sent = {}
    for name, (kind, value) in metric_values(figures).items():
        if kind == "incr":
            stats.incr(name, count=int(value), tags=tags)
        elif kind == "timing":
            stats.timing(name, timedelta(seconds=value), tags=tags)
        else:
            stats.gauge(name, value, tags=tags)
        sent[name] = value
    return sent
