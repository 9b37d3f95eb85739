"""The run report's building blocks: latency percentiles from a bounded histogram, bounded progress
samples, the stacked rows/s series, the servers' figures from cumulative counters, and the metrics."""

from __future__ import annotations

import numpy as np
import pytest

from airflow_batch_infer.client.timing import MAX_SAMPLES, LatencyHistogram, ProgressSamples
from airflow_batch_infer.report import server_figures
from airflow_batch_infer.report_charts import batch_size_chart, throughput_chart, throughput_series
from airflow_batch_infer.run_metrics import metric_values


def test_latency_percentiles_are_within_ten_percent_and_histograms_merge() -> None:
    rng = np.random.default_rng(3)
    latencies = rng.lognormal(np.log(0.02), 0.5, 5_000)  # about 20 ms
    first, second = LatencyHistogram(), LatencyHistogram()
    for i, seconds in enumerate(latencies):
        (first if i % 2 else second).add(float(seconds))
    merged = LatencyHistogram.merged([first.to_dict(), second.to_dict()])
    assert merged.total == 5_000
    assert len(merged.counts) < 60  # buckets, not latencies
    for share in (0.5, 0.95, 0.99):
        exact = np.quantile(latencies, share) * 1000
        assert exact <= merged.percentile_ms(share) <= exact * 1.1
    assert LatencyHistogram().percentile_ms(0.5) is None


def test_progress_samples_stay_bounded_and_keep_the_first_and_last() -> None:
    samples = ProgressSamples(interval=0)
    for rows in range(1, 1_000):
        samples.add(rows)
    samples.add(1_000, force=True)
    assert len(samples.samples) <= MAX_SAMPLES + 1
    assert samples.samples[0][1] == 0
    assert samples.samples[-1][1] == 1_000
    assert [s[1] for s in samples.samples] == sorted(s[1] for s in samples.samples)


def test_stacked_rows_per_second_adds_up_to_the_rows() -> None:
    tasks = [[[0.0, 0], [1.0, 1_000], [2.0, 3_000]], [[1.0, 0], [3.0, 4_000]]]
    starts, rates = throughput_series(tasks, bins=30)
    width = starts[1] - starts[0]
    assert [round(float(r.sum() * width)) for r in rates] == [3_000, 4_000]
    assert throughput_chart(tasks, ["chunk 0", "chunk 1"]).startswith(b"\x89PNG")
    assert batch_size_chart({"8": 3, "16": 1}).startswith(b"\x89PNG")
    assert batch_size_chart({}).startswith(b"\x89PNG")
    assert throughput_chart([], []).startswith(b"\x89PNG")  # no results given to persist


def snapshot(requests: int, rows: int, executions: int, batches: dict[str, int]) -> dict:
    return {
        "requests": requests,
        "queue_ns": requests * 2_000_000,
        "compute_ns": requests * 5_000_000,
        "inference_count": rows,
        "executions": executions,
        "batches": batches,
    }


def test_server_figures_take_each_servers_first_and_last_reading() -> None:
    # Two tasks overlapping on server a (their readings interleave), one on server b; a task that moved
    # servers has no first reading.
    results = [
        {
            "server": "a",
            "statistics": [snapshot(10, 100, 5, {"20": 5}), snapshot(30, 700, 15, {"20": 5, "60": 10})],
        },
        {
            "server": "a",
            "statistics": [snapshot(12, 140, 6, {"20": 6}), snapshot(25, 500, 12, {"20": 6, "60": 6})],
        },
        {"server": "b", "statistics": [snapshot(0, 0, 0, {}), snapshot(4, 64, 2, {"32": 2})]},
        {"server": "b", "statistics": [None, snapshot(4, 64, 2, {"32": 2})]},
    ]
    figures = server_figures(results)
    assert figures["servers"] == ["a", "b"]
    assert (figures["requests"], figures["rows"], figures["executions"]) == (24, 664, 12)
    assert figures["batch_sizes"] == {"32": 2, "60": 10}
    assert figures["average_batch_size"] == pytest.approx(664 / 12, abs=0.01)
    assert figures["queue_ms_per_request"] == 2.0
    assert figures["compute_ms_per_request"] == 5.0


def test_metrics_leave_out_what_was_not_reported() -> None:
    figures = {
        "rows": {"in": 10, "scored": 7, "set_aside": 1, "filtered": 2},
        "rows_per_second": 100.0,
        "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": None},
        "server": {"queue_ms_per_request": 0.5, "compute_ms_per_request": 1.5, "average_batch_size": None},
        "gpu_utilization": "not reported",
        "steps_seconds": {"stage": 0.2, "infer": 1.0, "persist": 0.1},
    }
    values = metric_values(figures)
    assert values["batch_infer.rows_scored"] == ("incr", 7.0)
    assert values["batch_infer.infer_seconds"] == ("timing", 1.0)
    assert "batch_infer.latency_p99_ms" not in values
    assert "batch_infer.gpu_utilization" not in values
    assert "batch_infer.average_batch_size" not in values


def test_a_report_that_cannot_be_written_does_not_fail_persist(tmp_path) -> None:
    from airflow_batch_infer.operators.persist import PersistOutputsOperator
    from airflow_batch_infer.report import publish_run_report
    from airflow_batch_infer.sinks.base import PersistResult
    from airflow_batch_infer.staging import Manifest

    blocker = tmp_path / "run"
    blocker.write_text("a file where the run folder should be")
    manifest = Manifest(
        run_dir=str(blocker), source="x", row_id_column="row_id", total_rows=0, chunk_rows=1, schema={}
    )
    persist = PersistOutputsOperator(task_id="persist", chunks=[], table="scores")
    committed = PersistResult("scores", "scores_rejects", "2026-11-21", 0, 0, 0, "warehouse.duckdb")
    # What persist (write_report) and the report task call: logs a warning, raises nothing.
    assert publish_run_report(manifest, [], committed, 0.1, [], {}, persist.log) is None
    assert blocker.read_text() == "a file where the run folder should be"
