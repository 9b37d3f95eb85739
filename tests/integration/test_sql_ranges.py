"""A PostgreSQL query exported in parallel ranges of one snapshot, on the real local server."""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import pendulum
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from airflow_batch_infer.errors import StagingError
from airflow_batch_infer.operators.stage import StageInputsOperator
from airflow_batch_infer.sources import SQLQuerySource, sql_ranges
from airflow_batch_infer.staging import Manifest, stage_source
from tests.aws_fixtures import PG_CONN_ID, pg_query, pg_schema

__all__ = ["pg_schema"]  # fixture used by name

ROWS = 200_000
LOGGER = "airflow_batch_infer.sources.sql_ranges"


@pytest.fixture
def features(pg_schema: str) -> str:
    """200,000 rows of many types; ``k`` (an integer split column) is null on every 500th row."""
    table = f'"{pg_schema}".features'
    pg_query(f"DROP TABLE IF EXISTS {table}")
    pg_query(
        f"CREATE TABLE {table} AS SELECT g::bigint AS id, (g % 1000)::numeric(12,2) AS v, g * 0.5 AS x, "
        "CASE WHEN g % 500 = 0 THEN NULL ELSE g::int END AS k, 'f' || g AS name, "
        "ARRAY['a', 'b' || (g % 3)] AS tags, timestamptz '2026-01-01 00:00+00' + g * interval '1 s' AS ts, "
        f"jsonb_build_object('g', g % 5) AS doc FROM generate_series(1, {ROWS}) g"
    )
    # Rewritten rows move to the end of the heap: the table's order is no longer the ids' order.
    pg_query(f"UPDATE {table} SET x = x + 0 WHERE id % 7 = 0")
    return table


def staged(manifest: Manifest) -> pa.Table:
    tables = [pq.read_table(c.path) for c in manifest.chunks]
    return pa.concat_tables(tables, promote_options="permissive")


def workers_that_ran(caplog: pytest.LogCaptureFixture) -> set[str]:
    return {r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("Worker ")}


def serial_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "serially, as one stream" in r.getMessage()]


def test_ranges_stage_the_same_rows_as_the_serial_export(
    features: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sql = f"SELECT id, v, x, k, name, tags, ts, doc FROM {features} WHERE id > %(low)s"
    params = {"low": 0}
    caplog.set_level(logging.INFO, logger=LOGGER)
    ranged = stage_source(
        SQLQuerySource(sql, conn_id=PG_CONN_ID, parameters=params, split_column="id", export_parallelism=3),
        tmp_path / "ranged",
        chunk_rows=50_000,
    )
    assert len(workers_that_ran(caplog)) == 3
    assert not serial_reasons(caplog)
    serial = stage_source(
        SQLQuerySource(sql, conn_id=PG_CONN_ID, parameters=params, split_column="id", export_parallelism=1),
        tmp_path / "serial",
        chunk_rows=50_000,
    )

    assert ranged.total_rows == serial.total_rows == ROWS
    assert ranged.schema == serial.schema  # the same Arrow types, whichever way the rows came
    assert len(ranged.chunks) == math.ceil(ROWS / 50_000)  # ranges span whole chunks of uniform ids
    assert [c.index for c in ranged.chunks] == list(range(len(ranged.chunks)))
    assert all(c.rows <= 50_000 for c in ranged.chunks)
    ours, theirs = staged(ranged), staged(serial)
    assert pc.count_distinct(ours.column("row_id")).as_py() == ROWS
    assert pc.min(ours.column("row_id")).as_py() == 0
    assert pc.max(ours.column("row_id")).as_py() == ROWS - 1
    for chunk in ranged.chunks:  # each chunk's ids run from its first_row, as the infer task expects
        ids = pq.read_table(chunk.path, columns=["row_id"]).column(0).to_pylist()
        assert ids == list(range(chunk.first_row, chunk.first_row + chunk.rows))
    assert pc.sum(ours.column("v")).as_py() == pc.sum(theirs.column("v")).as_py()
    ours, theirs = ours.drop(["row_id"]).sort_by("id"), theirs.drop(["row_id"]).sort_by("id")
    for name in ours.column_names:
        assert ours.column(name).combine_chunks().equals(theirs.column(name).combine_chunks()), name


def test_rows_committed_after_the_snapshot_reach_no_worker(
    features: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another connection inserts, deletes and updates rows once the snapshot is exported, before the
    workers import it: none of the workers sees any of it."""
    before = pg_query(f"SELECT count(*), sum(v), sum(x) FROM {features}")[0]
    worker, once = sql_ranges._Export._worker, threading.Lock()
    changed = []

    def change_then_work(self: sql_ranges._Export, number: int, share: list) -> list:
        with once:
            if not changed:
                pg_query(
                    f"INSERT INTO {features} (id, v, x, k, name) SELECT g, 1, 1, "
                    f"CASE WHEN g % 2 = 0 THEN NULL ELSE g END, 'new' FROM generate_series(1, {ROWS}, 100) g"
                )
                pg_query(f"DELETE FROM {features} WHERE id % 10 = 3")
                pg_query(f"UPDATE {features} SET x = -1 WHERE id % 10 = 4")
                changed.append(True)
        return worker(self, number, share)

    monkeypatch.setattr(sql_ranges._Export, "_worker", change_then_work)
    caplog.set_level(logging.INFO, logger=LOGGER)
    source = SQLQuerySource(
        f"SELECT * FROM {features}", conn_id=PG_CONN_ID, split_column="k", export_parallelism=3
    )
    manifest = stage_source(source, tmp_path / "run", chunk_rows=40_000)

    assert changed
    assert len(workers_that_ran(caplog)) == 3
    assert pg_query(f"SELECT count(*) FROM {features}")[0][0] != before[0]  # the table did change
    table = staged(manifest)
    assert manifest.total_rows == table.num_rows == before[0]
    assert pc.count_distinct(table.column("row_id")).as_py() == before[0]
    assert pc.count_distinct(table.column("id")).as_py() == before[0]
    assert pc.sum(table.column("v")).as_py() == before[1]
    assert pc.sum(table.column("x")).as_py() == before[2]
    assert pc.count(table.column("name"), mode="all").as_py() == before[0]
    assert "new" not in table.column("name").to_pylist()


def test_rows_whose_split_value_is_null_are_kept(features: str, tmp_path: Path) -> None:
    source = SQLQuerySource(
        f"SELECT id, k FROM {features}", conn_id=PG_CONN_ID, split_column="k", export_parallelism=2
    )
    manifest = stage_source(source, tmp_path / "run", chunk_rows=100_000, row_id_column="id")

    table = staged(manifest)
    assert table.num_rows == ROWS
    assert table.column("k").null_count == ROWS // 500
    assert pc.count_distinct(table.column("id")).as_py() == ROWS
    assert not manifest.generated_ids
    assert manifest.chunks[-1].rows == ROWS // 500  # the null range comes last, in chunks of its own


def test_the_same_snapshot_staged_twice_gives_every_row_the_same_id(features: str, tmp_path: Path) -> None:
    def ids(run: str) -> dict[int, int]:
        source = SQLQuerySource(
            f"SELECT id, k, name FROM {features}", conn_id=PG_CONN_ID, split_column="k", export_parallelism=3
        )
        table = staged(stage_source(source, tmp_path / run, chunk_rows=30_000))
        assert pc.count_distinct(table.column("row_id")).as_py() == table.num_rows == ROWS
        return dict(zip(table.column("id").to_pylist(), table.column("row_id").to_pylist(), strict=True))

    first, second = ids("first"), ids("second")
    assert first == second
    assert sorted(first.values()) == list(range(ROWS))


def test_a_query_that_does_not_allow_ranges_is_read_as_one_stream_and_says_why_once(
    features: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    cases = {
        "is not an integer": dict(sql=f"SELECT id, name FROM {features}", split_column="name"),
        "ORDER BY": dict(sql=f"SELECT id, name FROM {features} WHERE id <= 1000 ORDER BY id DESC"),
        "LIMIT": dict(sql=f"SELECT id, name FROM {features} LIMIT 1000"),
        "no split_column given": dict(sql=f"SELECT id, name FROM {features}", row_id_column=None),
    }
    for reason, case in cases.items():
        caplog.clear()
        row_id_column = case.pop("row_id_column", "id")
        source = SQLQuerySource(case.pop("sql"), conn_id=PG_CONN_ID, export_parallelism=3, **case)
        manifest = stage_source(source, tmp_path / "run", chunk_rows=500_000, row_id_column=row_id_column)
        assert [m for m in serial_reasons(caplog) if reason in m] == serial_reasons(caplog), reason
        assert len(serial_reasons(caplog)) == 1, reason
        assert not workers_that_ran(caplog)
        assert manifest.total_rows == (1000 if reason in ("ORDER BY", "LIMIT") else ROWS)
    # The order asked for is kept, and the ids follow it.
    ordered = SQLQuerySource(f"SELECT id FROM {features} WHERE id <= 5 ORDER BY id DESC", conn_id=PG_CONN_ID)
    table = staged(stage_source(ordered, tmp_path / "ordered", row_id_column="id"))
    assert table.column("id").to_pylist() == [5, 4, 3, 2, 1]
    with pytest.raises(StagingError, match=r"split_column 'nope' is not a column of the query"):
        stage_source(
            SQLQuerySource(f"SELECT id FROM {features}", conn_id=PG_CONN_ID, split_column="nope"),
            tmp_path / "r",
        )


def test_a_query_that_is_not_one_read_only_statement_is_still_refused(pg_schema: str, tmp_path: Path) -> None:
    pg_query(f'CREATE TABLE "{pg_schema}".guarded AS SELECT g AS id FROM generate_series(1, 10) g')
    pg_query(f'CREATE SEQUENCE "{pg_schema}".guard_ids')
    options = {"conn_id": PG_CONN_ID, "split_column": "id", "export_parallelism": 3}
    with pytest.raises(StagingError, match="exactly one statement"):
        SQLQuerySource(f'SELECT id FROM "{pg_schema}".guarded; DROP TABLE "{pg_schema}".guarded', **options)
    writing = f"SELECT nextval('\"{pg_schema}\".guard_ids') AS id FROM generate_series(1, 3)"
    with pytest.raises(StagingError, match=r"failed on connection 'pg_test'.*read-only transaction"):
        stage_source(SQLQuerySource(writing, **options), tmp_path / "r")
    deleting = f'WITH d AS (DELETE FROM "{pg_schema}".guarded RETURNING id) SELECT id FROM d'
    # Read as one stream, as before ranges: a server-side cursor refuses it.
    with pytest.raises(StagingError, match="must not contain data-modifying statements"):
        stage_source(SQLQuerySource(deleting, **options), tmp_path / "r")
    assert pg_query(f'SELECT last_value, is_called FROM "{pg_schema}".guard_ids') == [(1, False)]
    assert pg_query(f'SELECT count(*) FROM "{pg_schema}".guarded') == [(10,)]


def test_the_stage_operator_takes_the_range_options(
    features: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    stage = StageInputsOperator(
        task_id="stage",
        sql=f"SELECT id, v FROM {features}",
        sql_conn_id=PG_CONN_ID,
        sql_split_column="{{ params.split }}",
        sql_export_parallelism="2",
        staging_root=str(tmp_path / "staging"),
        chunk_rows=100_000,
        partition="p",
    )
    stage.render_template_fields({"params": {"split": "id"}})
    context = {"run_id": "manual__2026-11-21", "logical_date": pendulum.datetime(2026, 11, 21, tz="UTC")}
    chunks = stage.execute(context)
    assert sum(c["rows"] for c in chunks) == ROWS
    assert len(workers_that_ran(caplog)) == 2
    with pytest.raises(ValueError, match="export_parallelism must be a whole number of at least 1"):
        StageInputsOperator(task_id="bad", sql="SELECT 1", sql_export_parallelism=0)
