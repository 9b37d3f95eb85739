"""The run report: ``report.json`` and ``report.html`` in the run folder, written by the persist task.

What a run did, in the figures a team checks: rows in, scored, set aside (by reason) and filtered; the
wall time of each step; the job's true throughput (rows over the infer phase's wall time, all tasks
together); request latency percentiles from the client; the server's own queue and compute time per
request and its average batch size (Triton's statistics, read by each infer task as it starts and ends:
the counters are cumulative, so a server's work in the phase is its last reading less its first); GPU
utilisation where the server reports it; and two charts (:mod:`airflow_batch_infer.report_charts`),
embedded as PNG data so that the file opens offline.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import json
from collections.abc import Sequence
from typing import Any

import pyarrow.compute as pc

from airflow_batch_infer import storage
from airflow_batch_infer.client.streaming import REASON_COLUMN
from airflow_batch_infer.client.timing import LatencyHistogram
from airflow_batch_infer.links import REPORT_FILE
from airflow_batch_infer.parquet_files import open_parquet
from airflow_batch_infer.sinks.base import PersistResult
from airflow_batch_infer.staging import Manifest, RunPath, run_file, write_json_atomically
from airflow_batch_infer.templated import all_items

REPORT_JSON = "report.json"
CHARTS = {"throughput": "report-throughput.png", "batch_sizes": "report-batch-sizes.png"}
_MAX_REASONS = 20
_COUNTERS = ("requests", "queue_ns", "compute_ns", "inference_count", "executions")


def run_figures(
    manifest: Manifest,
    results: Sequence[dict[str, Any]],
    persisted: PersistResult,
    persist_seconds: float,
    rejects: Sequence[RunPath],
) -> dict[str, Any]:
    """The report's figures (what ``report.json`` holds and the metrics send).

    :param manifest: the run's manifest.
    :param results: the infer tasks' results (``ChunkResult`` dicts with the infer task's fields).
    :param persisted: what the sink committed.
    :param persist_seconds: the sink's wall time.
    :param rejects: the rejects parts, read for the reasons.
    """
    results = all_items(results)
    filtered = manifest.filtered_rows + sum(int(r.get("filtered_rows") or 0) for r in results)
    starts = [float(r.get("started_at") or 0) for r in results]
    ends = [s + float(r["seconds"]) for s, r in zip(starts, results, strict=True)]
    phase_start = min(starts, default=0.0)
    infer_seconds = max(ends, default=0.0) - phase_start
    rows_done = sum(int(r.get("rows_out") or 0) + int(r.get("rows_rejected") or 0) for r in results)
    latency = LatencyHistogram.merged(r.get("latency") or {} for r in results)
    gpu = [float(r["gpu_utilization"]) for r in results if r.get("gpu_utilization") is not None]
    return {
        "run": {"dag_id": manifest.dag_id, "run_id": manifest.run_id, "partition": persisted.partition},
        "table": persisted.table,
        "rejects_table": persisted.rejects_table,
        "filter": (manifest.row_filter or {}).get("text"),
        "rows": {
            "in": manifest.total_rows + manifest.filtered_rows,
            "scored": persisted.rows,
            "set_aside": persisted.rejected,
            "filtered": filtered,
            "set_aside_by_reason": reasons(rejects),
        },
        "steps_seconds": {
            "stage": manifest.stage_seconds,
            "infer": round(infer_seconds, 3),
            "persist": round(persist_seconds, 3),
        },
        "infer_tasks": len(results),
        "rows_per_second": round(rows_done / infer_seconds, 1) if infer_seconds > 0 else None,
        "latency_ms": {
            "requests": latency.total,
            "p50": latency.percentile_ms(0.50),
            "p95": latency.percentile_ms(0.95),
            "p99": latency.percentile_ms(0.99),
        },
        "server": server_figures(results),
        "gpu_utilization": round(sum(gpu) / len(gpu), 4) if gpu else "not reported",
        "progress": [
            [[round(t - phase_start, 3), rows] for t, rows in r.get("progress") or []] for r in results
        ],
        "chunks": [int(r.get("index", i)) for i, r in enumerate(results)],
    }


def reasons(rejects: Sequence[RunPath]) -> dict[str, int]:
    """Rows set aside per reason, most frequent first (at most 20 reasons; the rest as ``other``)."""
    counts: dict[str, int] = {}
    for part in rejects:
        parquet = open_parquet(part)
        if not parquet.metadata.num_rows:
            continue
        column = parquet.read(columns=[REASON_COLUMN]).column(REASON_COLUMN)
        for item in pc.value_counts(column).to_pylist():
            reason = item["values"] or "unknown"
            counts[reason] = counts.get(reason, 0) + int(item["counts"])
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = dict(ranked[:_MAX_REASONS])
    if len(ranked) > _MAX_REASONS:
        shown["other"] = sum(n for _, n in ranked[_MAX_REASONS:])
    return shown


def server_figures(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The servers' own figures over the infer phase, from the counters the infer tasks read.

    Per server, the earliest reading at a task's start and the latest at a task's end (the counters only
    grow) bound the phase; their difference is the server's work in it, whoever else was running.
    """
    first: dict[str, dict[str, Any]] = {}
    last: dict[str, dict[str, Any]] = {}
    for result in results:
        start, end = [*(result.get("statistics") or []), None, None][:2]
        server = str(result.get("server") or "")
        if start and (server not in first or start["requests"] < first[server]["requests"]):
            first[server] = start
        if end and (server not in last or end["requests"] > last[server]["requests"]):
            last[server] = end
    totals = dict.fromkeys(_COUNTERS, 0)
    batches: dict[str, int] = {}
    for server in set(first) & set(last):
        for name in _COUNTERS:
            totals[name] += int(last[server][name]) - int(first[server][name])
        for size, count in last[server]["batches"].items():
            grown = int(count) - int(first[server]["batches"].get(size, 0))
            if grown:
                batches[size] = batches.get(size, 0) + grown
    requests, executions = totals["requests"], totals["executions"]
    return {
        "servers": sorted(set(first) & set(last)),
        "requests": requests,
        "queue_ms_per_request": round(totals["queue_ns"] / requests / 1e6, 3) if requests else None,
        "compute_ms_per_request": round(totals["compute_ns"] / requests / 1e6, 3) if requests else None,
        "rows": totals["inference_count"],
        "executions": executions,
        "average_batch_size": round(totals["inference_count"] / executions, 2) if executions else None,
        "batch_sizes": dict(sorted(batches.items(), key=lambda kv: int(kv[0]))),
    }


def write_run_report(run_dir: str, figures: dict[str, Any]) -> RunPath:
    """Write ``report.json``, the two chart PNGs and ``report.html`` (charts embedded) into ``run_dir``;
    returns the HTML's path.

    :param run_dir: the run folder, local or on object storage.
    :param figures: from :func:`run_figures`.
    """
    write_json_atomically(run_file(run_dir, REPORT_JSON), figures)
    charts: dict[str, bytes] = {}
    if importlib.util.find_spec("matplotlib") is not None:  # the `report` extra
        from airflow_batch_infer.report_charts import batch_size_chart, throughput_chart

        charts = {
            "throughput": throughput_chart(figures["progress"], [f"chunk {c}" for c in figures["chunks"]]),
            "batch_sizes": batch_size_chart(figures["server"]["batch_sizes"]),
        }
    for name, png in charts.items():
        storage.write_bytes(run_file(run_dir, CHARTS[name]), png)
    target = run_file(run_dir, REPORT_FILE)
    storage.write_bytes(target, render_html(figures, charts).encode())
    return target


def publish_run_report(
    manifest: Manifest,
    results: Sequence[dict[str, Any]],
    persisted: PersistResult,
    persist_seconds: float,
    rejects: Sequence[RunPath],
    tags: dict[str, str],
    log: Any,
) -> RunPath | None:
    """Write the run report and send its figures as metrics, once the partition is committed: a failure
    is logged as a warning, never raised. Returns the HTML's path (``None`` when it failed).

    :param manifest: the run's manifest.
    :param results: the infer tasks' results.
    :param persisted: what the sink committed.
    :param persist_seconds: the sink's wall time.
    :param rejects: the rejects parts, read for the reasons.
    :param tags: the metrics' tags (``dag_id``, ``table``).
    :param log: the task's logger.
    """
    from airflow_batch_infer.run_metrics import emit_run_metrics

    try:
        figures = run_figures(manifest, results, persisted, persist_seconds, rejects)
        report = write_run_report(manifest.run_dir, figures)
        emit_run_metrics(figures, tags)
    except Exception as error:
        log.warning("The run report could not be written: %s", error, exc_info=True)
        return None
    log.info("Run report: %s", report)
    return report


def render_html(figures: dict[str, Any], charts: dict[str, bytes]) -> str:
    """The report as one self-contained HTML page (no script, no remote resource)."""
    rows, server, latency = figures["rows"], figures["server"], figures["latency_ms"]
    run = figures["run"]

    def table(title: str, pairs: Sequence[tuple[str, Any]]) -> str:
        body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_shown(v)}</td></tr>" for k, v in pairs)
        return f"<h2>{html.escape(title)}</h2><table>{body}</table>"

    def image(name: str, alt: str) -> str:
        if name not in charts:
            return f"<p>{html.escape(alt)}: install the <code>report</code> extra (matplotlib).</p>"
        data = base64.b64encode(charts[name]).decode()
        return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'

    sections = [
        table(
            "Rows",
            [
                ("in", rows["in"]),
                ("scored", rows["scored"]),
                ("set aside", rows["set_aside"]),
                (
                    "filtered out" + (f" by {figures['filter']}" if figures["filter"] else ""),
                    rows["filtered"],
                ),
            ],
        ),
        table("Set aside, by reason", list(rows["set_aside_by_reason"].items()) or [("none", 0)]),
        table("Wall time of each step (s)", list(figures["steps_seconds"].items())),
        table(
            "Throughput and latency",
            [
                ("rows/s (rows over the infer phase's wall time, all tasks)", figures["rows_per_second"]),
                ("infer tasks", figures["infer_tasks"]),
                ("requests (client)", latency["requests"]),
                (
                    "request latency p50 / p95 / p99 (ms)",
                    f"{latency['p50']} / {latency['p95']} / {latency['p99']}",
                ),
            ],
        ),
        table(
            "Triton server (its statistics over the infer phase)",
            [
                ("servers", ", ".join(server["servers"]) or "not read"),
                ("requests", server["requests"]),
                ("queue time per request (ms)", server["queue_ms_per_request"]),
                ("compute time per request (ms)", server["compute_ms_per_request"]),
                ("model executions (batches)", server["executions"]),
                ("average batch size (rows)", server["average_batch_size"]),
                ("GPU utilisation", figures["gpu_utilization"]),
            ],
        ),
        "<h2>Charts</h2>",
        image("throughput", "Rows/s over time, all infer tasks stacked"),
        image("batch_sizes", "Batch sizes the server executed"),
    ]
    title = f"Run report: {run['dag_id']} {run['run_id']} (partition {run['partition']})"
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Output table {html.escape(figures['table'])}, rows set aside in "
        f"{html.escape(figures['rejects_table'])}.</p>" + "".join(sections) + "</body></html>"
    )


def _shown(value: Any) -> str:
    if value is None:
        return "not reported"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def load_report(run_dir: str) -> dict[str, Any]:
    """A run's ``report.json``."""
    return json.loads(storage.read_text(run_file(run_dir, REPORT_JSON)))


_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;margin-bottom:1em}"
    "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}td{text-align:right}"
    "img{max-width:100%}"
)
