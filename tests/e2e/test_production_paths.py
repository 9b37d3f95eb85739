"""The pipeline run by Airflow (``dag.test()``) on production stores: Parquet on S3 in, PostgreSQL out.

S3 is a local moto_server reached through a real ``aws`` connection, PostgreSQL the real local server;
only connections and arguments differ from the embedded default.
"""

from __future__ import annotations

import pendulum
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transactions_data import FEATURES, write_transactions

from tests.aws_fixtures import PG_CONN_ID, aws_client, aws_conn, bucket, moto_endpoint, pg_query, pg_schema
from tests.conftest import MODEL_REPOSITORY, column_layouts, task_states
from tests.dag_registry import register_dag

__all__ = ["aws_conn", "bucket", "moto_endpoint", "pg_schema"]  # fixtures used by name

pytestmark = pytest.mark.e2e

LOGICAL_DATE = pendulum.datetime(2026, 11, 21, tz="UTC")


def test_parquet_on_s3_scored_into_postgres_once_per_partition(
    airflow_db, aws_conn, bucket: str, pg_schema: str, tmp_path
) -> None:
    from airflow.sdk import DAG

    from airflow_batch_infer.task_group import batch_inference

    rows = 6_000
    write_transactions(tmp_path / "etl", rows, files=2)
    for path in sorted((tmp_path / "etl").glob("*.parquet")):
        aws_client("s3").put_object(
            Bucket=bucket, Key=f"etl/transactions/{path.name}", Body=path.read_bytes()
        )

    with DAG(dag_id="e2e_s3_to_postgres", schedule=None, start_date=LOGICAL_DATE) as dag:
        batch_inference(
            source=f"s3://{aws_conn}@{bucket}/etl/transactions",
            model_name="risk_scorer",
            model_repository=MODEL_REPOSITORY,
            inputs={"features": FEATURES},
            outputs={"probability": "risk_score"},
            passthrough_columns=["transaction_id"],
            columns=["transaction_id", *FEATURES],
            table=f"{pg_schema}.transaction_scores",
            chunk_rows=3_000,
            staging_root=str(tmp_path / "staging"),
            runtime_options={"work_root": str(tmp_path / "servers")},
            sink="postgres",
            sink_options={"postgres_conn_id": PG_CONN_ID},
        )
    register_dag(dag)

    for _ in range(2):
        run = dag.test(logical_date=LOGICAL_DATE)
        assert run.state == "success", task_states(run)
        assert pg_query(
            "SELECT batch_partition, count(*), count(DISTINCT transaction_id) "
            f'FROM "{pg_schema}".transaction_scores GROUP BY 1'
        ) == [("2026-11-21", rows, rows)]

    source = pq.read_table(tmp_path / "etl").sort_by("transaction_id")
    scored = pg_query(
        f'SELECT transaction_id, risk_score FROM "{pg_schema}".transaction_scores ORDER BY transaction_id'
    )
    assert [r[0] for r in scored] == source.column("transaction_id").to_pylist()
    assert all(0 < r[1] < 1 for r in scored)
    assert pg_query(f'SELECT count(*) FROM "{pg_schema}".transaction_scores_rejects') == [(0,)]


def test_the_demo_dag_points_at_s3_and_postgres_by_params_alone(
    airflow_db, aws_conn, bucket: str, pg_schema: str, tmp_path
) -> None:
    """What docs/how-to/sinks.md promises: the shipped demo DAG, unchanged, reads S3, stages on S3 and
    writes PostgreSQL when only connections and Params change."""
    from tests.conftest import load_dag

    rows = 4_000
    write_transactions(tmp_path / "etl", rows, files=1, row_group_rows=2_000)
    for path in sorted((tmp_path / "etl").glob("*.parquet")):
        aws_client("s3").put_object(Bucket=bucket, Key=f"etl/{path.name}", Body=path.read_bytes())
    conf = {
        "input_path": f"s3://{aws_conn}@{bucket}/etl",
        "staging_root": f"s3://{aws_conn}@{bucket}/staging",
        "sink": "postgres",
        "sink_options": {"postgres_conn_id": PG_CONN_ID},
        "table": f"{pg_schema}.demo_scores",
        "chunk_rows": 2_000,
    }
    dag = load_dag("batch_inference_demo")

    run = dag.test(logical_date=LOGICAL_DATE, run_conf=conf)

    assert run.state == "success", task_states(run)
    assert pg_query(f'SELECT count(*), count(DISTINCT transaction_id) FROM "{pg_schema}".demo_scores') == [
        (rows, rows)
    ]
    staged = aws_client("s3").list_objects_v2(Bucket=bucket, Prefix="staging/")["Contents"]
    part = next(o["Key"] for o in staged if o["Key"].endswith("outputs/part-00001.parquet"))
    # A part on object storage travels and rests compressed: Snappy on its ids, which every reader knows.
    body = aws_client("s3").get_object(Bucket=bucket, Key=part)["Body"].read()
    codecs = {column: codec for column, (codec, _) in column_layouts(pa.BufferReader(body)).items()}
    assert codecs == {"row_id": "SNAPPY", "transaction_id": "SNAPPY", "risk_score": "UNCOMPRESSED"}
