"""Allowlists: a run's Params cannot point the stage or the sink outside the roots and connections allowed."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_batch_infer.allowlist import NotAllowedError, check_location, check_sink, conn_id_of
from airflow_batch_infer.operators.persist import PersistOutputsOperator
from airflow_batch_infer.operators.stage import StageInputsOperator

CONTEXT = {"run_id": "manual__1", "partition_key": "2026-11-21"}


def stage(tmp_path: Path, **overrides: object) -> StageInputsOperator:
    (tmp_path / "in").mkdir(exist_ok=True)
    pq.write_table(pa.table({"x": [1.0, 2.0]}), tmp_path / "in" / "a.parquet")
    arguments = {
        "source": str(tmp_path / "in"),
        "staging_root": str(tmp_path / "staging"),
        "allowed_roots": [str(tmp_path / "in"), str(tmp_path / "staging"), "s3://lake/scores"],
        "allowed_conn_ids": ["aws_lake", "warehouse"],
        "sink": "duckdb",
        "sink_options": {"database": str(tmp_path / "staging" / "w.duckdb")},
    } | overrides
    return StageInputsOperator(task_id="stage", **arguments)


def test_a_run_inside_its_allowlists_stages(tmp_path: Path) -> None:
    chunks = stage(tmp_path).execute(CONTEXT)
    assert sum(c["rows"] for c in chunks) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"source": "/etc"}, r"source /etc is not under any of the allowed roots"),
        ({"source": "{in}/../../elsewhere"}, r"source .* is not under any of the allowed roots"),
        ({"staging_root": "/tmp"}, r"staging_root /tmp is not under"),
        ({"source_conn_id": "aws_admin"}, r"source_conn_id names connection 'aws_admin'"),
        ({"sink": "postgres", "sink_options": {"postgres_conn_id": "prod_db"}}, r"'prod_db'"),
        ({"sink_options": '{"database": "/var/lib/other.duckdb"}'}, r"sink_options.database /var/lib"),
        (
            {"sink": "s3_parquet", "sink_options": {"path": "s3://lake/scoresheet", "conn_id": "aws_lake"}},
            r"sink_options.path s3://lake/scoresheet is not under",  # a sibling, not a folder below
        ),
        (
            {"sink": "s3_parquet", "sink_options": {"path": "s3://aws_admin@lake/scores/x"}},
            r"sink_options.path names connection 'aws_admin'",
        ),
        (
            {"sink": "iceberg", "sink_options": {"warehouse": "/tmp/lake"}},
            r"sink_options.warehouse /tmp/lake",
        ),
        ({"sink": "iceberg", "sink_options": {"catalog_conn_id": "glue_prod"}}, r"'glue_prod'"),
        (
            {"sink": "iceberg", "sink_options": {"catalog": {"type": "rest", "uri": "http://elsewhere"}}},
            r"sink_options.catalog configures the iceberg sink's endpoint inline",
        ),
    ],
)
def test_params_cannot_point_a_run_elsewhere(tmp_path: Path, overrides: dict, message: str) -> None:
    overrides = {k: v.format(**{"in": tmp_path / "in"}) if k == "source" else v for k, v in overrides.items()}
    operator = stage(tmp_path, **overrides)
    with pytest.raises(NotAllowedError, match=message) as refused:
        operator.execute(CONTEXT)
    assert isinstance(refused.value, AirflowFailException)  # no retry: the same Params fail the same way
    assert not (tmp_path / "staging" / "stage").exists()  # refused before anything was staged


def test_persist_checks_its_sink_again(tmp_path: Path) -> None:
    persist = PersistOutputsOperator(
        task_id="persist",
        chunks=[{"run_dir": str(tmp_path), "index": 0, "path": "", "rows": 1, "bytes": 1}],
        table="scores",
        sink="postgres",
        sink_options={"postgres_conn_id": "prod_db"},
        allowed_conn_ids=["warehouse"],
    )
    with pytest.raises(NotAllowedError, match="'prod_db'"):
        persist.execute(CONTEXT | {"run_id": "manual__1"})


def test_locations_and_connections_are_compared_whole(tmp_path: Path) -> None:
    check_location(tmp_path / "a" / "b", [str(tmp_path / "a")], "x")
    with pytest.raises(NotAllowedError):
        check_location(tmp_path / "ab", [str(tmp_path / "a")], "x")
    check_location("s3://conn@lake/scores/day=1", ["s3://lake/scores"], "x")
    with pytest.raises(NotAllowedError):
        check_location("s3://lake/scores/../secrets", ["s3://lake/scores"], "x")
    with pytest.raises(NotAllowedError):
        check_location("gs://lake/scores", ["s3://lake/scores"], "x")
    assert conn_id_of("s3://aws_x@bucket/k") == "aws_x"
    assert conn_id_of("s3://bucket/k") is None
    check_sink("duckdb", {"database": "/anywhere.duckdb"}, None, None)  # no allowlist: no check
