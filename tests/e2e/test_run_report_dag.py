"""The demo DAG with a row filter, run by Airflow (``dag.test()``) against a real tritonserver and DuckDB:
the run report's numbers match the warehouse, its charts are embedded, and its figures reach a StatsD
listener through Airflow's metrics."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pendulum
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from transactions_data import write_transactions

from tests.conftest import load_dag, task_states

pytestmark = pytest.mark.e2e

LOGICAL_DATE = pendulum.datetime(2026, 11, 23, tz="UTC")
FILTER = "amount > 20 AND customer_id < 150000"


def with_null_features(folder: Path, every: int) -> None:
    """Blank ``f03`` in every ``every``-th row of the first file: those rows are set aside."""
    path = sorted(folder.glob("*.parquet"))[0]
    table = pq.read_table(path)
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[::every] = True
    blanked = pc.if_else(pa.array(mask), pa.scalar(None, pa.float32()), table.column("f03"))
    table = table.set_column(table.schema.get_field_index("f03"), "f03", blanked)
    pq.write_table(table, path, row_group_size=2_000)


class StatsdListener(threading.Thread):
    """A UDP socket on localhost, read as the packets come: every task of the run sends Airflow's own
    metrics too, and a socket read only at the end overflowed its buffer and dropped the report's."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.port = self.socket.getsockname()[1]
        self.lines: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.lines += self.socket.recv(65_536).decode().splitlines()
            except TimeoutError:
                continue

    def received(self) -> dict[str, tuple[float, str]]:
        """StatsD lines received so far: name → (value, type) for ``airflow.batch_infer.*``."""
        time.sleep(0.3)  # what was sent last is read
        found = {}
        for line in list(self.lines):
            match = re.fullmatch(r"airflow\.(batch_infer\.[a-z0-9_]+):([-0-9.e]+)\|(c|g|ms)", line)
            if match:
                found[match[1]] = (float(match[2]), match[3])
        return found

    def close(self) -> None:
        self._done.set()
        self.join()
        self.socket.close()


@pytest.fixture
def statsd_listener(monkeypatch):
    """A StatsD listener, and Airflow's metrics pointed at it as ``[metrics] statsd_on`` would."""
    from airflow.sdk.observability import stats
    from airflow.sdk.observability.metrics import stats_utils

    listener = StatsdListener()
    listener.start()
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_ON", "True")
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_HOST", "127.0.0.1")
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_PORT", str(listener.port))
    monkeypatch.setenv("AIRFLOW__METRICS__STATSD_PREFIX", "airflow")
    # What the task runner does at start (dag.test() runs the tasks in this process).
    stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)
    try:
        yield listener
    finally:
        monkeypatch.delenv("AIRFLOW__METRICS__STATSD_ON")
        stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)
        listener.close()


def test_the_report_of_a_filtered_demo_run_matches_the_warehouse(airflow_db, tmp_path, statsd_listener):
    from airflow_batch_infer.paths import batch_infer_home

    rows = 24_000
    write_transactions(tmp_path / "in", rows, files=3, row_group_rows=2_000)
    with_null_features(tmp_path / "in", every=50)
    source = ds.dataset(tmp_path / "in").to_table()
    keep = pc.and_(pc.greater(source["amount"], 20), pc.less(source["customer_id"], 150_000))
    kept = source.filter(keep)
    expected_rejected = kept.filter(pc.is_null(kept["f03"])).num_rows
    assert 0 < expected_rejected < kept.num_rows < rows

    dag = load_dag("batch_inference_demo")
    conf = {
        "input_path": str(tmp_path / "in"),
        "chunk_rows": 6_000,
        "table": "scores_report",
        "filter": FILTER,
    }
    run = dag.test(logical_date=LOGICAL_DATE, run_conf=conf)
    assert run.state == "success", task_states(run)

    warehouse = batch_infer_home() / "warehouse.duckdb"
    with duckdb.connect(str(warehouse), read_only=True) as con:
        scored = con.execute(
            "SELECT count(*), min(transaction_id IN (SELECT unnest($ids))) FROM scores_report "
            "WHERE batch_partition = '2026-11-23'",
            {"ids": kept["transaction_id"].to_pylist()},
        ).fetchone()
        set_aside = con.execute(
            "SELECT reject_reason, count(*) FROM scores_report_rejects WHERE batch_partition = '2026-11-23' "
            "GROUP BY 1"
        ).fetchall()
    assert scored == (kept.num_rows - expected_rejected, True)  # only rows the filter keeps are scored
    assert set_aside == [("null in column 'f03'", expected_rejected)]

    run_dir = next((batch_infer_home() / "staging" / "batch_inference_demo" / "2026-11-23").iterdir())
    report = json.loads((run_dir / "report.json").read_text())
    assert report["filter"] == FILTER
    assert report["rows"] == {
        "in": rows,
        "scored": scored[0],
        "set_aside": expected_rejected,
        "filtered": rows - kept.num_rows,
        "set_aside_by_reason": {"null in column 'f03'": expected_rejected},
    }
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["filtered_rows"] == rows - kept.num_rows
    steps = report["steps_seconds"]
    assert steps["stage"] > 0
    assert steps["infer"] > 0
    assert steps["persist"] > 0
    assert report["infer_tasks"] == len(task_states(run)["infer"]) > 1
    # Throughput: rows read by the infer tasks over the phase's wall time.
    assert report["rows_per_second"] == pytest.approx(
        (scored[0] + expected_rejected) / steps["infer"], rel=0.01
    )
    latency = report["latency_ms"]
    assert latency["requests"] > 0
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    server = report["server"]
    # The server's own counters over the phase: every row scored went through it, in requests of batches.
    assert server["rows"] == scored[0]
    assert server["requests"] == latency["requests"]
    assert sum(server["batch_sizes"].values()) == server["executions"]
    assert server["average_batch_size"] == pytest.approx(scored[0] / server["executions"], abs=0.01)
    assert server["queue_ms_per_request"] >= 0
    assert server["compute_ms_per_request"] > 0
    assert report["gpu_utilization"] == "not reported"  # a CPU server
    # Progress samples end at each task's rows read.
    assert sum(samples[-1][1] for samples in report["progress"]) == scored[0] + expected_rejected

    page = (run_dir / "report.html").read_text()
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 2
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"""(src|href)=["']https?:""", page)
    assert "<script" not in page
    assert f"{scored[0]:,}" in page
    assert "not reported" in page

    metrics = statsd_listener.received()
    assert metrics["batch_infer.rows_scored"] == (scored[0], "c")
    assert metrics["batch_infer.rows_filtered"] == (rows - kept.num_rows, "c")
    assert metrics["batch_infer.rows_set_aside"] == (expected_rejected, "c")
    assert metrics["batch_infer.rows_per_second"][1] == "g"
    assert metrics["batch_infer.average_batch_size"] == (server["average_batch_size"], "g")
    assert metrics["batch_infer.infer_seconds"] == (pytest.approx(steps["infer"] * 1000, rel=0.01), "ms")
    assert "batch_infer.gpu_utilization" not in metrics  # not reported: not sent
