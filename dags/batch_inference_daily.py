"""The demo's daily twin: score the transactions once a day, one warehouse partition per day.

``batch_inference_demo`` runs when the ETL's Asset is updated; this DAG runs on a time schedule instead,
so a date range can be backfilled from the UI (Trigger → Backfill, or ``airflow backfill create --dag-id
batch_inference_daily --from-date 2026-11-01 --to-date 2026-11-07``): each day's run writes, and on a rerun
replaces, the partition named by its date (``{{ ds }}``). Params: the model's name and version, the input
and the table.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG
from transactions_data import RISK_SCORING, model_params, table_param

from airflow_batch_infer.paths import batch_infer_home
from airflow_batch_infer.task_group import batch_inference

with DAG(
    dag_id="batch_inference_daily",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["demo", "triton"],
    params={**model_params(), "table": table_param("transaction_scores_daily")},
    doc_md=__doc__,
) as dag:
    batch_inference(
        source="{{ params.input_path }}",
        model_name="{{ params.model_name }}",
        **RISK_SCORING,
        table="{{ params.table }}",
        partition="{{ ds }}",  # the run's day: a backfill writes one partition per day
        sink_options={"database": str(batch_infer_home() / "warehouse.duckdb")},
        infer_options={"model_version": "{{ params.model_version }}"},
    )
