"""Params all the way down: model, inputs and outputs from a run's Params, a site's own sink, and a daily
backfill."""

from __future__ import annotations

import duckdb
import pendulum
import pyarrow.parquet as pq
import pytest
from transactions_data import FEATURES, write_transactions

from tests.conftest import MODEL_REPOSITORY, load_dag, task_states
from tests.dag_registry import register_dag

pytestmark = pytest.mark.e2e


def test_the_daily_twin_writes_the_partition_of_its_logical_date(airflow_db, tmp_path) -> None:
    from airflow_batch_infer.paths import batch_infer_home

    dag = load_dag("batch_inference_daily")
    assert dag.schedule == "@daily"  # a time schedule: a date range can be backfilled
    assert not dag.catchup
    write_transactions(tmp_path / "in", 6_000, files=2, row_group_rows=1_500)
    conf = {"input_path": str(tmp_path / "in"), "table": "daily_e2e", "model_version": "1"}

    for day in (5, 6):
        run = dag.test(logical_date=pendulum.datetime(2026, 11, day, tz="UTC"), run_conf=conf)
        assert run.state == "success", task_states(run)

    with duckdb.connect(str(batch_infer_home() / "warehouse.duckdb"), read_only=True) as con:
        counts = con.execute(
            "SELECT batch_partition, count(*), count(DISTINCT transaction_id) FROM daily_e2e "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert counts == [("2026-11-05", 6_000, 6_000), ("2026-11-06", 6_000, 6_000)]


def test_inputs_and_outputs_from_params_reach_a_sink_given_by_class_path(airflow_db, tmp_path) -> None:
    from airflow.sdk import DAG, Param

    from airflow_batch_infer.task_group import batch_inference

    write_transactions(tmp_path / "in", 5_000, files=1, row_group_rows=2_500)
    with DAG(
        dag_id="e2e_templated_params",
        schedule=None,
        start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
        params={
            "model_name": Param("risk_scorer", type="string"),
            "inputs": Param({"features": FEATURES}, type="object"),
            "outputs": Param({"probability": "risk_score"}, type="object"),
            "passthrough_columns": Param(["amount"], type="array"),
            "row_id_column": Param("transaction_id", type="string"),
            "max_rejected_fraction": Param(0.0, type="number"),
        },
    ) as dag:
        batch_inference(
            source=str(tmp_path / "in"),
            model_name="{{ params.model_name }}",
            model_repository=MODEL_REPOSITORY,
            inputs="{{ params.inputs | tojson }}",
            outputs="{{ params.outputs | tojson }}",
            passthrough_columns="{{ params.passthrough_columns | tojson }}",
            row_id_column="{{ params.row_id_column }}",
            max_rejected_fraction="{{ params.max_rejected_fraction }}",
            table="scored",
            partition="p1",
            chunk_rows=2_500,
            staging_root=str(tmp_path / "staging"),
            runtime_options={"work_root": str(tmp_path / "servers")},
            sink="tests.plugin_sink:ParquetFolderSink",
            sink_options={"folder": str(tmp_path / "lake")},
        )
    register_dag(dag)

    run = dag.test(
        logical_date=pendulum.datetime(2026, 11, 21, tz="UTC"),
        run_conf={"outputs": {"probability": "fraud_probability"}},
    )

    assert run.state == "success", task_states(run)
    scored = pq.read_table(tmp_path / "lake" / "scored" / "batch_partition=p1.parquet")
    assert scored.num_rows == 5_000
    assert {"transaction_id", "amount", "fraud_probability"} <= set(scored.column_names)
    assert "risk_score" not in scored.column_names
    assert sorted(scored.column("transaction_id").to_pylist()) == list(range(10_000_000, 10_005_000))
    probabilities = scored.column("fraud_probability").to_pylist()
    assert all(0 < p < 1 for p in probabilities)
