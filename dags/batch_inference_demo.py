"""Score every transaction with the ``risk_scorer`` model on Triton, after each ETL run.

Scheduled on the ETL's Asset; for a manual run or a backfill, trigger it from the UI with Params
(model name and version, input path, partition, chunk rows, request rows, requests in flight, staging
root, sink). Embedded defaults: a local ``tritonserver`` process, local files under ``$BATCH_INFER_HOME``,
and a DuckDB warehouse; S3 and PostgreSQL by changing connections and Params only (docs/how-to/sinks.md).
Its daily twin, ``batch_inference_daily``, runs on a time schedule, so a date range can be backfilled from
the UI.
"""

from __future__ import annotations

import json
import os

import pendulum
from airflow.sdk import DAG, Param
from transactions_data import RISK_SCORING, TRANSACTIONS, model_params, table_param

from airflow_batch_infer.paths import batch_infer_home
from airflow_batch_infer.task_group import batch_inference

# What a run's Params may point at (JSON lists of roots and of connection ids); unset: anything.
ALLOWED_ROOTS = json.loads(os.environ.get("BATCH_INFER_ALLOWED_ROOTS", "null"))
ALLOWED_CONN_IDS = json.loads(os.environ.get("BATCH_INFER_ALLOWED_CONN_IDS", "null"))

with DAG(
    dag_id="batch_inference_demo",
    schedule=[TRANSACTIONS],
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["demo", "triton"],
    params={
        **model_params(),
        "partition": Param(
            None,
            type=["null", "string"],
            description="Partition to (re)write, e.g. 2026-11-21. Empty: the run's date.",
        ),
        "table": table_param("transaction_scores"),
        "chunk_rows": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            description="Rows per mapped infer task. Empty: one chunk per infer task that can run at once.",
        ),
        "snapshot": Param(
            "reference",
            enum=["reference", "copy"],
            description="reference: pin the input files and read them in place; copy: copy the rows first.",
        ),
        "filter": Param(
            "",
            type="string",
            description="Rows to score, as after WHERE (e.g. amount > 100 AND customer_id < 100000).",
        ),
        "request_rows": Param(
            None, type=["null", "integer"], minimum=1, description="Rows per gRPC request (default: model's)."
        ),
        "max_in_flight": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            description="Requests in flight per task (default: model's).",
        ),
        "staging_root": Param(
            None,
            type=["null", "string"],
            description="Where chunks and outputs go, e.g. s3://aws_default@bucket/staging. Empty: local.",
        ),
        "servers": Param(
            1,
            type="integer",
            minimum=1,
            maximum=8,
            description="Local Triton servers the run starts (each gets its share of the GPUs); the infer "
            "tasks spread their chunks over them.",
        ),
        "limit_rows": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            description="Smoke run: score only the first N rows, into the scratch partition "
            "<partition>__limit_<N> (the real partition is not touched). Empty: every row.",
        ),
        "validate_only": Param(
            False,
            type="boolean",
            description="Only check the mapping against the model's config.pbtxt and the sink's table; "
            "start no server, score and write nothing.",
        ),
        "sink": Param("duckdb", enum=["duckdb", "postgres", "s3_parquet", "redshift", "athena", "iceberg"]),
        "sink_options": Param(
            {"database": str(batch_infer_home() / "warehouse.duckdb")},
            type="object",
            description='Options of the sink, e.g. {"postgres_conn_id": "postgres_default"}; for iceberg, '
            '{} (the embedded catalog under $BATCH_INFER_HOME/iceberg) or {"catalog_conn_id": "glue_lake"}.',
        ),
    },
    doc_md=__doc__,
) as dag:
    batch_inference(
        source="{{ params.input_path }}",
        model_name="{{ params.model_name }}",
        **RISK_SCORING,
        table="{{ params.table }}",
        partition="{{ params.partition or '' }}",
        chunk_rows="{{ params.chunk_rows or 'auto' }}",
        snapshot="{{ params.snapshot }}",
        filter="{{ params.filter or '' }}",
        request_rows="{{ params.request_rows or '' }}",
        max_in_flight="{{ params.max_in_flight or '' }}",
        staging_root="{{ params.staging_root or '' }}",
        sink="{{ params.sink }}",
        sink_options="{{ params.sink_options | tojson }}",
        servers="{{ params.servers }}",
        allowed_roots=ALLOWED_ROOTS,
        allowed_conn_ids=ALLOWED_CONN_IDS,
        limit_rows="{{ params.limit_rows or '' }}",
        validate_only="{{ params.validate_only }}",
        infer_options={"model_version": "{{ params.model_version }}"},
    )
