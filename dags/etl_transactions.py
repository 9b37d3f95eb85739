"""The upstream ETL of the demo: writes the day's transactions as Parquet and updates their Asset.

The batch inference DAG is scheduled on that Asset, so it runs after every successful ETL run.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import Param, dag, task
from transactions_data import TRANSACTIONS, TRANSACTIONS_PATH, write_transactions  # dags/ is on sys.path

DEMO_ROWS = int(os.environ.get("BATCH_INFER_DEMO_ROWS", "1000000"))


@dag(
    dag_id="etl_transactions",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    params={"rows": Param(DEMO_ROWS, type="integer", minimum=1, description="Transactions to generate.")},
    tags=["demo", "etl"],
)
def etl_transactions() -> None:
    @task(outlets=[TRANSACTIONS])
    def extract_transactions(params: dict | None = None) -> dict:
        rows = int((params or {}).get("rows", DEMO_ROWS))
        write_transactions(TRANSACTIONS_PATH, rows)
        return {"path": str(TRANSACTIONS_PATH), "rows": rows}

    extract_transactions()


etl_transactions()
