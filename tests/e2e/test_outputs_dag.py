"""Analyst-shaped outputs through the whole pipeline (``dag.test()``): the classifier's probabilities as
named columns, a decision made in pandas in the infer tasks, every other input column beside them, into
the real DuckDB warehouse."""

from __future__ import annotations

import duckdb
import numpy as np
import pendulum
import pyarrow.parquet as pq
import pytest
from transactions_data import FEATURES, write_transactions

from tests.conftest import MODEL_REPOSITORY, task_states
from tests.dag_registry import register_dag

pytestmark = pytest.mark.e2e

LOGICAL_DATE = pendulum.datetime(2026, 12, 6, tz="UTC")


def refer_or_clear(frame):
    """The analysts' rule: refer a case when its malignant probability passes 0.5."""
    frame["decision"] = np.where(frame["p_malignant"] > 0.5, "refer", "clear")
    return frame


def test_named_probabilities_a_pandas_decision_and_passthrough_land_in_the_warehouse(
    airflow_db, tmp_path
) -> None:
    from airflow.sdk import DAG

    from airflow_batch_infer.paths import batch_infer_home
    from airflow_batch_infer.task_group import batch_inference

    rows = 6_000
    write_transactions(tmp_path / "etl", rows, files=2, row_group_rows=1_000)
    with DAG(dag_id="e2e_analyst_outputs", schedule=None, start_date=LOGICAL_DATE) as dag:
        batch_inference(
            source=str(tmp_path / "etl"),
            model_name="tumor_classifier",
            model_repository=MODEL_REPOSITORY,
            inputs={"features": FEATURES[:8]},
            outputs={"probabilities": ["p_benign", "p_malignant"]},
            passthrough_columns="*",
            postprocess=refer_or_clear,
            table="analyst_scores",
            chunk_rows=2_000,
            staging_root=str(tmp_path / "staging"),
            runtime_options={"work_root": str(tmp_path / "servers")},
        )
    register_dag(dag)

    run = dag.test(logical_date=LOGICAL_DATE)
    assert run.state == "success", task_states(run)

    source = pq.read_table(tmp_path / "etl").to_pandas()
    with duckdb.connect(str(batch_infer_home() / "warehouse.duckdb"), read_only=True) as con:
        table = con.execute("SELECT * FROM analyst_scores ORDER BY transaction_id").df()
    assert len(table) == rows
    assert table["transaction_id"].tolist() == source["transaction_id"].tolist()
    for column in ["customer_id", "amount", *FEATURES[8:]]:  # every column the model does not read
        assert table[column].tolist() == source[column].tolist(), column
    assert not set(FEATURES[:8]) & set(table.columns)
    np.testing.assert_allclose(table["p_benign"] + table["p_malignant"], 1.0, atol=1e-5)
    assert (table["decision"] == np.where(table["p_malignant"] > 0.5, "refer", "clear")).all()
    assert set(table["decision"]) == {"refer", "clear"}
