"""Score the ETL's output after every ETL run: the whole pipeline as one task group."""

import pendulum
from airflow.sdk import DAG, Asset

from airflow_batch_infer.task_group import batch_inference

transactions = Asset(name="transactions", uri="file:///data/etl/transactions")  # the ETL's outlet

with DAG("nightly_scoring", schedule=[transactions], start_date=pendulum.datetime(2026, 11, 1)):
    batch_inference(
        source="/data/etl/transactions",  # Parquet file or folder; Jinja allowed
        model_name="risk_scorer",
        model_repository="/opt/triton_models",
        inputs={"features": [f"f{i:02d}" for i in range(16)]},  # tensor <- columns stacked
        outputs={"probability": "risk_score"},  # tensor -> output column
        passthrough_columns=["transaction_id"],
        table="transaction_scores",
        sink_options={"database": "/data/warehouse.duckdb"},
    )
