"""Sources: a SQL query (embedded DuckDB) snapshotted into chunks, and the stage operator's inputs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import duckdb
import pendulum
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_batch_infer.errors import StagingError
from airflow_batch_infer.operators.stage import StageInputsOperator
from airflow_batch_infer.sources import ParquetSource, SQLQuerySource
from airflow_batch_infer.staging import Manifest, stage_source

CONTEXT = {"run_id": "manual__2026-11-21", "logical_date": pendulum.datetime(2026, 11, 21, tz="UTC")}


@pytest.fixture
def warehouse(tmp_path: Path) -> Path:
    database = tmp_path / "w.duckdb"
    with duckdb.connect(str(database)) as con:
        con.execute(
            "CREATE TABLE events AS SELECT i AS event_id, (i * 0.5)::DOUBLE AS x, 'e' || i AS name "
            "FROM range(1000) t(i)"
        )
    return database


def chunk_table(manifest: Manifest) -> pa.Table:
    return pa.concat_tables(pq.read_table(c.path) for c in manifest.chunks)


def test_a_query_is_snapshotted_and_later_changes_do_not_reach_the_chunks(
    warehouse: Path, tmp_path: Path
) -> None:
    source = SQLQuerySource(
        "SELECT event_id, x, name FROM events WHERE event_id >= $low ORDER BY event_id",
        parameters={"low": 100},
        database=str(warehouse),
        batch_rows=128,
    )
    manifest = stage_source(source, tmp_path / "run", chunk_rows=400, row_id_column="event_id")

    assert [c.rows for c in manifest.chunks] == [400, 400, 100]
    assert manifest.schema == {"event_id": "int64", "x": "double", "name": "string"}
    assert manifest.source.startswith("SQL on DuckDB")
    assert "WHERE event_id >= $low" in manifest.source
    with duckdb.connect(str(warehouse)) as con:
        con.execute("DELETE FROM events")
        con.execute("INSERT INTO events VALUES (5000, 1.0, 'new')")
    table = chunk_table(Manifest.load(tmp_path / "run"))
    assert table.column("event_id").to_pylist() == list(range(100, 1000))
    assert table.column("name").to_pylist()[:2] == ["e100", "e101"]


def test_a_query_of_unknown_size_is_regrouped_within_max_chunks(warehouse: Path, tmp_path: Path) -> None:
    source = SQLQuerySource("SELECT x FROM events ORDER BY event_id", database=str(warehouse), batch_rows=64)
    manifest = stage_source(source, tmp_path / "run", chunk_rows=10, max_chunks=7)

    assert len(manifest.chunks) <= 7
    assert manifest.chunk_rows == 143
    table = chunk_table(manifest)
    assert table.column("row_id").to_pylist() == list(range(1000))
    assert table.column("x").to_pylist() == [i * 0.5 for i in range(1000)]
    assert [c.first_row for c in manifest.chunks] == [i * 143 for i in range(len(manifest.chunks))]
    assert not (tmp_path / "run" / "chunks").exists()


def test_a_duckdb_connection_names_the_database(
    warehouse: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DUCK_TEST", json.dumps({"conn_type": "duckdb", "host": str(warehouse)}))
    source = SQLQuerySource("SELECT event_id, x FROM events WHERE event_id < 10", conn_id="duck_test")
    manifest = stage_source(source, tmp_path / "run", columns=["x"])
    assert chunk_table(manifest).column_names == ["row_id", "x"]
    assert manifest.total_rows == 10


def test_query_errors_say_what_is_wrong(warehouse: Path, tmp_path: Path) -> None:
    with pytest.raises(StagingError, match="query is empty"):
        SQLQuerySource("  ")
    with pytest.raises(StagingError, match="The query failed on DuckDB"):
        stage_source(SQLQuerySource("SELECT nope FROM events", database=str(warehouse)), tmp_path / "r")
    with pytest.raises(StagingError, match=r"Column\(s\) \['nope'\] are not in the input SQL on DuckDB"):
        stage_source(
            SQLQuerySource("SELECT x FROM events", database=str(warehouse)), tmp_path / "r", columns=["nope"]
        )
    with pytest.raises(StagingError, match="already has a column 'row_id'"):
        stage_source(
            SQLQuerySource("SELECT x AS row_id FROM events", database=str(warehouse)), tmp_path / "r"
        )
    with pytest.raises(StagingError, match="does not exist"):
        stage_source(SQLQuerySource("SELECT 1", database=str(tmp_path / "absent.duckdb")), tmp_path / "r")


def test_a_query_can_only_read_its_database(warehouse: Path, tmp_path: Path) -> None:
    """A query from a manual run's Params writes nothing and reaches no file or URL."""
    with pytest.raises(StagingError, match=r"exactly one statement .* it holds 2: DELETE FROM events"):
        SQLQuerySource("DELETE FROM events; SELECT * FROM events", database=str(warehouse))
    assert SQLQuerySource("SELECT ';' AS semicolon FROM events;", database=str(warehouse))  # one statement
    (tmp_path / "secret.csv").write_text("user,password\nroot,hunter2\n")
    with pytest.raises(StagingError, match="file system operations are disabled"):
        stage_source(
            SQLQuerySource(f"SELECT * FROM read_csv('{tmp_path / 'secret.csv'}')", database=str(warehouse)),
            tmp_path / "r",
        )
    with pytest.raises(StagingError, match="read-only mode"):
        stage_source(
            SQLQuerySource("INSERT INTO events VALUES (1, 1.0, 'x') RETURNING *", database=str(warehouse)),
            tmp_path / "r",
        )
    with duckdb.connect(str(warehouse), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM events").fetchone() == (1000,)


def test_parquet_source_reads_only_the_columns_asked_for(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"a": [1, 2], "b": [3.0, 4.0], "c": ["x", "y"]}), tmp_path / "in" / "p.parquet")
    source = ParquetSource(tmp_path / "in")
    assert source.count_rows() == 2
    with source.open(["c", "a"]) as reader:
        assert reader.read_all().to_pydict() == {"c": ["x", "y"], "a": [1, 2]}
    with pytest.raises(StagingError, match=r"\['z'\] are not in the input"), source.open(["z"]):
        pass


def test_stage_operator_takes_exactly_one_input(warehouse: Path, tmp_path: Path) -> None:
    both = StageInputsOperator(task_id="both", source=str(tmp_path), sql="SELECT 1", partition="p")
    with pytest.raises(ValueError, match="exactly one input"):
        both.execute(CONTEXT)
    neither = StageInputsOperator(task_id="neither", source="", sql="", partition="p")
    with pytest.raises(ValueError, match="exactly one input"):
        neither.execute(CONTEXT)

    query = StageInputsOperator(
        task_id="query",
        sql="SELECT event_id, x FROM events",
        sql_database=str(warehouse),
        sql_conn_id="",
        staging_root=str(tmp_path / "staging"),
        chunk_rows=300,
        row_id_column="event_id",
        partition="2026-11-21",
    )
    chunks = query.execute(CONTEXT)
    assert [c["rows"] for c in chunks] == [300, 300, 300, 100]
    run_dir = Path(chunks[0]["run_dir"])
    assert run_dir.relative_to(tmp_path / "staging").parts[1] == "2026-11-21"
    assert run_dir.name.startswith("manual__2026-11-21-")
    assert Manifest.load(run_dir).total_rows == 1000


def test_a_duckdb_query_stays_one_stream_and_says_why_once(
    warehouse: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="airflow_batch_infer.sources.sql_ranges")
    source = SQLQuerySource(
        "SELECT event_id, x FROM events",
        database=str(warehouse),
        split_column="event_id",
        export_parallelism=3,
    )
    manifest = stage_source(source, tmp_path / "run", chunk_rows=300, row_id_column="event_id")

    assert [c.rows for c in manifest.chunks] == [300, 300, 300, 100]
    reasons = [r.getMessage() for r in caplog.records if "serially, as one stream" in r.getMessage()]
    assert len(reasons) == 1
    assert "DuckDB" in reasons[0]


def test_range_options_are_checked_up_front(warehouse: Path) -> None:
    for bad in (0, -2, "two", 1.5, True):
        with pytest.raises(StagingError, match="export_parallelism must be a whole number of at least 1"):
            SQLQuerySource("SELECT 1", database=str(warehouse), export_parallelism=bad)
        with pytest.raises(ValueError, match="export_parallelism must be a whole number"):
            StageInputsOperator(task_id="bad", sql="SELECT 1", sql_export_parallelism=bad)
    with pytest.raises(StagingError, match="split_column must be the name of a column"):
        SQLQuerySource("SELECT 1", database=str(warehouse), split_column=3)
    assert SQLQuerySource("SELECT 1", export_parallelism="2").export_parallelism == 2
    assert SQLQuerySource("SELECT 1", split_column=" id ").split_column == "id"
    assert SQLQuerySource("SELECT 1").export_parallelism == max(1, min(4, os.cpu_count() or 1))
    templated = StageInputsOperator(
        task_id="templated",
        sql="SELECT 1",
        sql_export_parallelism="{{ params.n }}",
        sql_split_column="{{ x }}",
    )
    assert templated.sql_export_parallelism == "{{ params.n }}"
