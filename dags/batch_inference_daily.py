"""The demo's daily twin: score the transactions once a day, one warehouse partition per day.

``batch_inference_demo`` runs when the ETL's Asset is updated; this DAG runs on a time schedule instead,
so a date range can be backfilled from the UI (Trigger → Backfill, or ``airflow backfill create --dag-id
batch_inference_daily --from-date 2026-11-01 --to-date 2026-11-07``): each day's run writes, and on a rerun
replaces, the partition named by its date (``{{ ds }}``). Params: the model's name and version, the input
and the table.
"""

from __future__ import annotations

from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param
from transactions_data import FEATURES, TRANSACTIONS_PATH

from airflow_batch_infer.paths import batch_infer_home
from airflow_batch_infer.task_group import batch_inference

REPOSITORY = Path(__file__).resolve().parent.parent / "triton_models"

with DAG(
    dag_id="batch_inference_daily",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["demo", "triton"],
    params={
        "model_name": Param("risk_scorer", type="string", description="Triton model to call."),
        "model_version": Param(
            "", type="string", description="Model version to call; empty: the server's choice."
        ),
        "input_path": Param(str(TRANSACTIONS_PATH), type="string", description="Parquet file or folder."),
        "table": Param(
            "transaction_scores_daily",
            type="string",
            pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$",
            description="Output table, or schema.table.",
        ),
    },
    doc_md=__doc__,
) as dag:
    batch_inference(
        source="{{ params.input_path }}",
        model_name="{{ params.model_name }}",
        model_repository=REPOSITORY,
        inputs={"features": FEATURES},
        outputs={"probability": "risk_score"},
        passthrough_columns=["transaction_id"],
        table="{{ params.table }}",
        partition="{{ ds }}",  # the run's day: a backfill writes one partition per day
        sink_options={"database": str(batch_infer_home() / "warehouse.duckdb")},
        infer_options={"model_version": "{{ params.model_version }}"},
    )
