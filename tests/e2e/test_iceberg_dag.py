"""The demo DAG run by Airflow (``dag.test()``) into an Iceberg table: real tasks, tritonserver, pyiceberg."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pendulum
import pytest
from transactions_data import write_transactions

from tests.conftest import load_dag, task_states

pytestmark = pytest.mark.e2e

LOGICAL_DATE = pendulum.datetime(2026, 11, 21, tz="UTC")


def test_the_demo_dag_replaces_its_iceberg_partition(airflow_db, tmp_path: Path) -> None:
    from airflow_batch_infer.sinks import get_sink

    rows = 6_000
    write_transactions(tmp_path / "in", rows, files=2, row_group_rows=1_000)
    conf = {
        "input_path": str(tmp_path / "in"),
        "chunk_rows": 2_000,
        "table": "lake.scores_e2e",
        "sink": "iceberg",
        "sink_options": {"warehouse": str(tmp_path / "lake")},
    }
    dag = load_dag("batch_inference_demo")

    first = dag.test(logical_date=LOGICAL_DATE, run_conf=conf)
    assert first.state == "success", task_states(first)
    again = dag.test(logical_date=LOGICAL_DATE, run_conf=conf)
    assert again.state == "success", task_states(again)

    sink = get_sink("iceberg", table="lake.scores_e2e", warehouse=str(tmp_path / "lake"))
    table = sink.catalog().load_table(sink.identifier("lake.scores_e2e"))
    scored = table.scan().to_arrow()
    assert scored.num_rows == rows
    assert len(set(scored.column("row_id").to_pylist())) == rows
    assert set(scored.column("batch_partition").to_pylist()) == {"2026-11-21"}
    # Two runs, two snapshots: the rerun replaced the partition in one overwrite.
    assert [s.summary.operation.value for s in table.snapshots()] == ["append", "overwrite"]
    assert table.current_snapshot().summary["deleted-records"] == str(rows)
    rejects = sink.catalog().load_table(sink.identifier("lake.scores_e2e_rejects"))
    assert rejects.scan().to_arrow().num_rows == 0

    files = [t.file.file_path.removeprefix("file://") for t in table.scan().plan_files()]
    with duckdb.connect() as con:
        counted = con.execute(
            "SELECT count(*), count(DISTINCT transaction_id), min(risk_score) > 0, max(risk_score) < 1 "
            "FROM read_parquet($files)",
            {"files": files},
        ).fetchone()
    assert counted == (rows, rows, True, True)
