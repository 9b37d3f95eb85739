"""PostgreSQL, the real local server: a query snapshotted into chunks, partitions replaced exactly once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pendulum
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_batch_infer.errors import StagingError
from airflow_batch_infer.operators.persist import PersistOutputsOperator
from airflow_batch_infer.sinks import SchemaMismatchError, get_sink
from airflow_batch_infer.sinks import postgres as postgres_sink
from airflow_batch_infer.sources import SQLQuerySource
from airflow_batch_infer.staging import ChunkDescriptor, Manifest, stage_source, write_json_atomically
from tests.aws_fixtures import PG_CONN_ID, PG_DSN, pg_query, pg_schema, write_run_parts

__all__ = ["pg_schema"]  # fixture used by name

CONTEXT = {"run_id": "manual__2026-11-21", "logical_date": pendulum.datetime(2026, 11, 21, tz="UTC")}


def sink(schema: str, table: str = "scores", **options):
    return get_sink("postgres", table=f"{schema}.{table}", postgres_conn_id=PG_CONN_ID, **options)


def partition_counts(schema: str, table: str = "scores") -> dict[str, tuple[int, int]]:
    rows = pg_query(
        "SELECT batch_partition, count(*), count(DISTINCT row_id) "
        f'FROM "{schema}"."{table}" GROUP BY 1 ORDER BY 1'
    )
    return {p: (n, distinct) for p, n, distinct in rows}


def test_a_query_streams_one_snapshot_that_later_changes_do_not_reach(pg_schema: str, tmp_path: Path) -> None:
    pg_query(
        f'CREATE TABLE "{pg_schema}".features AS SELECT g AS id, g * 0.5 AS x, (g % 7)::numeric(6,2) AS n, '
        "ARRAY[g::real, 0.5::real] AS pair, 'f' || g AS name FROM generate_series(1, 2500) g"
    )
    source = SQLQuerySource(
        f'SELECT id, x, n, pair, name FROM "{pg_schema}".features WHERE id > %(low)s ORDER BY id',
        conn_id=PG_CONN_ID,
        parameters={"low": 500},
        batch_rows=300,
    )
    manifest = stage_source(source, tmp_path / "run", chunk_rows=800, row_id_column="id")
    pg_query(f'UPDATE "{pg_schema}".features SET x = -1')
    pg_query(f'DELETE FROM "{pg_schema}".features WHERE id > 1000')

    assert [c.rows for c in manifest.chunks] == [800, 800, 400]
    assert manifest.schema == {
        "id": "int32",
        "x": "double",  # numeric without precision
        "n": "decimal128(6, 2)",
        "pair": "list<item: float>",
        "name": "string",
    }
    table = pa.concat_tables(pq.read_table(c.path) for c in Manifest.load(tmp_path / "run").chunks)
    assert table.column("id").to_pylist() == list(range(501, 2501))
    assert [float(v) for v in table.column("x").to_pylist()[:2]] == [250.5, 251.0]
    assert table.column("pair").to_pylist()[0] == [501.0, 0.5]
    assert pg_query("SELECT count(*) FROM pg_cursors") == [(0,)]


def test_query_errors_name_the_problem(pg_schema: str, tmp_path: Path) -> None:
    with pytest.raises(StagingError, match=r"returns column\(s\) \['a'\] more than once"):
        stage_source(SQLQuerySource("SELECT 1 AS a, 2 AS a", conn_id=PG_CONN_ID), tmp_path / "r")
    with pytest.raises(StagingError, match=r"The query failed on connection 'pg_test'.*no_such_table"):
        stage_source(SQLQuerySource("SELECT * FROM no_such_table", conn_id=PG_CONN_ID), tmp_path / "r")


def test_a_query_runs_in_a_read_only_transaction(pg_schema: str, tmp_path: Path) -> None:
    # Names of its own: the schema is the module's, and other tests use "t".
    pg_query(f'CREATE TABLE "{pg_schema}".read_only_source AS SELECT g AS id FROM generate_series(1, 10) g')
    pg_query(f'CREATE SEQUENCE "{pg_schema}".ids')
    # A query that writes through a function (nextval advances a sequence) is refused, not just undone.
    writing = f"SELECT nextval('\"{pg_schema}\".ids') AS id FROM generate_series(1, 3)"
    with pytest.raises(StagingError, match="read-only transaction"):
        stage_source(SQLQuerySource(writing, conn_id=PG_CONN_ID), tmp_path / "r", row_id_column="id")
    assert pg_query(f'SELECT last_value, is_called FROM "{pg_schema}".ids') == [(1, False)]
    with pytest.raises(StagingError, match="exactly one statement"):
        SQLQuerySource(f'SELECT 1; DROP TABLE "{pg_schema}".read_only_source', conn_id=PG_CONN_ID)
    assert pg_query(f'SELECT count(*) FROM "{pg_schema}".read_only_source') == [(10,)]


def test_a_partition_is_replaced_never_doubled(pg_schema: str, tmp_path: Path) -> None:
    outputs, rejects = write_run_parts(tmp_path / "run", [[1, 2, 3], [4, 5]], rejected=frozenset({5}))
    scores = sink(pg_schema)

    first = scores.replace_partition("2026-11-21", outputs, rejects)
    second = scores.replace_partition("2026-11-21", outputs, rejects)
    scores.replace_partition("2026-11-22", outputs[:1], rejects[:1])

    assert (first.rows, first.rejected, first.replaced) == (4, 1, 0)
    assert (second.rows, second.rejected, second.replaced) == (4, 1, 4)
    assert partition_counts(pg_schema) == {"2026-11-21": (4, 4), "2026-11-22": (3, 3)}
    assert partition_counts(pg_schema, "scores_rejects") == {"2026-11-21": (1, 1)}
    assert pg_query(
        f"SELECT score, label FROM \"{pg_schema}\".scores WHERE row_id = 4 AND batch_partition = '2026-11-21'"
    ) == [(pytest.approx(0.04), "r4")]
    columns = pg_query(
        "SELECT column_name, udt_name FROM information_schema.columns WHERE table_schema = %s "
        "AND table_name = 'scores' ORDER BY ordinal_position",
        (pg_schema,),
    )
    assert columns == [
        ("batch_partition", "text"),
        ("row_id", "int8"),
        ("score", "float4"),
        ("label", "text"),
    ]


def test_a_failed_attempt_that_sent_half_its_parts_leaves_nothing_behind(
    pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_outputs, old_rejects = write_run_parts(tmp_path / "old", [[1, 2]])
    scores = sink(pg_schema, "retried")
    scores.replace_partition("p", old_outputs, old_rejects)
    outputs, rejects = write_run_parts(tmp_path / "new", [[10, 11, 12], [13, 14]])

    send = postgres_sink.iter_part_batches

    def half_then_fail(parts, batch_rows):
        yield from send(parts[:1], batch_rows)
        raise OSError("connection to the object store lost")

    monkeypatch.setattr(postgres_sink, "iter_part_batches", half_then_fail)
    with pytest.raises(OSError, match="object store lost"):
        scores.replace_partition("p", outputs, rejects)
    assert pg_query(f'SELECT row_id FROM "{pg_schema}".retried ORDER BY 1') == [(1,), (2,)]

    monkeypatch.undo()
    scores.replace_partition("p", outputs, rejects)
    assert pg_query(f'SELECT row_id FROM "{pg_schema}".retried ORDER BY 1') == [(i,) for i in range(10, 15)]


def test_an_existing_table_that_does_not_fit_is_named(pg_schema: str, tmp_path: Path) -> None:
    outputs, rejects = write_run_parts(tmp_path / "run", [[1]])
    pg_query(
        f'CREATE TABLE "{pg_schema}".typed (batch_partition text, row_id bigint, score text, label text)'
    )
    pg_query(
        f'CREATE TABLE "{pg_schema}".narrow (batch_partition text, row_id bigint, score double precision)'
    )
    pg_query(f'CREATE TABLE "{pg_schema}".foreign_t (row_id bigint, score real, label text)')
    with pytest.raises(
        SchemaMismatchError, match=r"Column 'score' of table .*typed is text but the outputs hold real"
    ):
        sink(pg_schema, "typed").replace_partition("p", outputs, rejects)
    with pytest.raises(SchemaMismatchError, match=r"Table .*narrow has no column 'label' \(text\)"):
        sink(pg_schema, "narrow").replace_partition("p", outputs, rejects)
    with pytest.raises(SchemaMismatchError, match="has no partition column 'batch_partition'"):
        sink(pg_schema, "foreign_t").replace_partition("p", outputs, rejects)
    with pytest.raises(SchemaMismatchError, match="does not exist and create_table is off"):
        sink(pg_schema, "absent", create_table=False).replace_partition("p", outputs, rejects)
    assert pg_query(f'SELECT count(*) FROM "{pg_schema}".narrow') == [(0,)]


def test_values_survive_the_copy(pg_schema: str, tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    tricky = pa.table(
        {
            "row_id": pa.array([1, 2, 3], pa.int64()),
            "text": pa.array(['a,"b"\nc', "", None]),
            "embedding": pa.array([[0.25, 1.5], [None, 2.0], None], pa.list_(pa.float32())),
            "flag": pa.array([True, False, None]),
            "wide": pa.array([2**40, -1, None], pa.int64()),
        }
    )
    pq.write_table(tricky, tmp_path / "parts" / "out.parquet")
    pq.write_table(
        pa.table({"row_id": pa.array([], pa.int64()), "reject_reason": pa.array([], pa.string())}),
        tmp_path / "parts" / "rej.parquet",
    )
    sink(pg_schema, "Tricky").replace_partition(
        "p", [tmp_path / "parts" / "out.parquet"], [tmp_path / "parts" / "rej.parquet"]
    )
    assert pg_query(f'SELECT row_id, text, embedding, flag, wide FROM "{pg_schema}"."Tricky" ORDER BY 1') == [
        (1, 'a,"b"\nc', [0.25, 1.5], True, 2**40),
        (2, "", [None, 2.0], False, -1),
        (3, None, None, None, None),
    ]


def write_parts(directory: Path, outputs: pa.Table) -> tuple[list[Path], list[Path]]:
    """One output part holding ``outputs`` and one empty rejects part."""
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(outputs, directory / "out.parquet")
    pq.write_table(
        pa.table({"row_id": pa.array([], pa.int64()), "reject_reason": pa.array([], pa.string())}),
        directory / "rej.parquet",
    )
    return [directory / "out.parquet"], [directory / "rej.parquet"]


def column_types(schema: str, table: str) -> list[tuple[str, str]]:
    return pg_query(
        "SELECT column_name, udt_name FROM information_schema.columns WHERE table_schema = %s "
        "AND table_name = %s ORDER BY ordinal_position",
        (schema, table),
    )


def test_a_table_named_with_or_without_its_schema_is_one_table_with_one_lock(
    pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``t`` found through search_path and ``<schema>.t`` replace one partition and wait on one lock."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_PG_PATH",
        f"postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{pg_schema}",
    )
    outputs, rejects = write_run_parts(tmp_path / "run", [[1, 2, 3]])
    bare = get_sink("postgres", table="t", postgres_conn_id="pg_path")

    first = bare.replace_partition("p", outputs, rejects)
    second = sink(pg_schema, "t").replace_partition("p", outputs, rejects)

    assert (first.rows, first.replaced, second.rows, second.replaced) == (3, 0, 3, 3)
    assert partition_counts(pg_schema, "t") == {"p": (3, 3)}
    waiting = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND classid = to_regclass(%s) AND objsubid = 2"
    )
    qualified = f'"{pg_schema}"."t"'
    with psycopg.connect(**PG_DSN) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(to_regclass(%s)::oid::int, hashtext('p'))", (qualified,))
        results = []
        worker = threading.Thread(
            target=lambda: results.append(bare.replace_partition("p", outputs, rejects))
        )
        worker.start()
        deadline = time.monotonic() + 20
        while pg_query(waiting, (qualified,)) != [(1,)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pg_query(waiting, (qualified,)) == [(1,)]
        assert results == []
    worker.join(30)
    assert (results[0].rows, results[0].replaced) == (3, 3)
    assert partition_counts(pg_schema, "t") == {"p": (3, 3)}


EXACT = pa.table(
    {
        "row_id": pa.array([1, 2, 3], pa.int64()),
        "score": pa.array([0.1, -1.5, None], pa.float32()),
        "wide": pa.array([0.1, 1e-300, None], pa.float64()),
        "count": pa.array([7, -(2**31), None], pa.int32()),
        "label": pa.array(['say "hi", then\nbye,', "", None]),
        "flag": pa.array([True, False, None]),
        "embedding": pa.array([[0.25, -1.5], [None, 3.0], None], pa.list_(pa.float32(), 2)),
    }
)
EXACT_SELECT = (
    "SELECT row_id::text, score::text, wide::text, count, label, flag, embedding::text FROM {} ORDER BY 1"
)


def test_values_and_types_land_exactly_in_a_new_table(pg_schema: str, tmp_path: Path) -> None:
    outputs, rejects = write_parts(tmp_path / "parts", EXACT)
    sink(pg_schema, "exact").replace_partition("p", outputs, rejects)

    assert column_types(pg_schema, "exact") == [
        ("batch_partition", "text"),
        ("row_id", "int8"),
        ("score", "float4"),
        ("wide", "float8"),
        ("count", "int4"),
        ("label", "text"),
        ("flag", "bool"),
        ("embedding", "_float4"),
    ]
    assert pg_query(EXACT_SELECT.format(f'"{pg_schema}".exact')) == [
        ("1", "0.1", "0.1", 7, 'say "hi", then\nbye,', True, "{0.25,-1.5}"),
        ("2", "-1.5", "1e-300", -(2**31), "", False, "{NULL,3}"),
        ("3", None, None, None, None, None, None),
    ]


@pytest.mark.parametrize(
    ("score", "wide", "embedding", "tiny"),
    [
        ("double precision", "double precision", "double precision[]", "1e-300"),  # cast in Arrow
        # Floats as the text that PostgreSQL parses, as the CSV load sent them.
        ("numeric", "numeric", "numeric[]", "0." + "0" * 299 + "1"),
    ],
)
def test_values_land_exactly_in_an_existing_table_of_wider_types(
    pg_schema: str, tmp_path: Path, score: str, wide: str, embedding: str, tiny: str
) -> None:
    table = "wider_" + score.split()[0]
    pg_query(
        f'CREATE TABLE "{pg_schema}".{table} (batch_partition varchar(20) NOT NULL, row_id numeric, '
        f"score {score}, wide {wide}, count bigint, label varchar, flag boolean, embedding {embedding}, "
        "loaded_at timestamptz NOT NULL DEFAULT now())"
    )
    outputs, rejects = write_parts(tmp_path / "parts", EXACT)
    wider = sink(pg_schema, table)
    wider.replace_partition("p", outputs, rejects)
    again = wider.replace_partition("p", outputs, rejects)

    assert (again.rows, again.replaced) == (3, 3)
    assert pg_query(EXACT_SELECT.format(f'"{pg_schema}".{table}')) == [
        ("1", "0.1", "0.1", 7, 'say "hi", then\nbye,', True, "{0.25,-1.5}"),
        ("2", "-1.5", tiny, -(2**31), "", False, "{NULL,3}"),
        ("3", None, None, None, None, None, None),
    ]


def test_a_partition_column_of_another_type_is_matched_by_its_type(pg_schema: str, tmp_path: Path) -> None:
    pg_query(
        f'CREATE TABLE "{pg_schema}".dated '
        "(batch_partition date NOT NULL, row_id bigint, score real, label text)"
    )
    outputs, rejects = write_run_parts(tmp_path / "run", [[1, 2]])
    dated = sink(pg_schema, "dated")
    dated.replace_partition("2026-11-21", outputs, rejects)
    again = dated.replace_partition("2026-11-21", outputs, rejects)

    assert (again.rows, again.replaced) == (2, 2)
    assert pg_query(f'SELECT batch_partition::text, count(*) FROM "{pg_schema}".dated GROUP BY 1') == [
        ("2026-11-21", 2)
    ]


def test_a_type_that_does_not_fit_is_named_and_nothing_is_written(pg_schema: str, tmp_path: Path) -> None:
    pg_query(
        f'CREATE TABLE "{pg_schema}".ints (batch_partition text, row_id bigint, score real, wide real, '
        "count bigint, label text, flag boolean, embedding integer[])"
    )
    outputs, rejects = write_parts(tmp_path / "parts", EXACT)
    with pytest.raises(
        SchemaMismatchError,
        match=r"Column 'wide' of table .*ints is real but the outputs hold double precision",
    ):
        sink(pg_schema, "ints").replace_partition("p", outputs, rejects)
    pg_query(f'ALTER TABLE "{pg_schema}".ints ALTER COLUMN wide TYPE double precision')
    with pytest.raises(
        SchemaMismatchError,
        match=r"Column 'embedding' of table .*ints is integer\[\] but the outputs hold real\[\]",
    ):
        sink(pg_schema, "ints").replace_partition("p", outputs, rejects)
    assert pg_query(f'SELECT count(*) FROM "{pg_schema}".ints') == [(0,)]
    assert pg_query("SELECT to_regclass(%s)", (f'"{pg_schema}".ints_rejects',)) == [(None,)]


def test_the_persist_operator_writes_to_postgres_from_params(pg_schema: str, tmp_path: Path) -> None:
    write_run_parts(tmp_path / "run", [[7, 8]])
    chunk = ChunkDescriptor(str(tmp_path / "run"), 0, str(tmp_path / "run" / "chunks" / "c.parquet"), 2, 1)
    manifest = Manifest(str(tmp_path / "run"), "test", "row_id", 2, 2, {}, [chunk])
    write_json_atomically(tmp_path / "run" / "manifest.json", manifest.to_dict())
    persist = PersistOutputsOperator(
        task_id="persist",
        chunks=[chunk.to_dict()],
        table=f"{pg_schema}.from_params",
        sink="postgres",
        sink_options=json.dumps({"postgres_conn_id": PG_CONN_ID}),
        partition="2026-11-21",
    )
    summary = persist.execute(CONTEXT)
    assert (summary["rows"], summary["location"]) == (2, "postgresql://127.0.0.1:5432/test")
    assert partition_counts(pg_schema, "from_params") == {"2026-11-21": (2, 2)}
    with pytest.raises(ValueError, match="Invalid table name"):
        PersistOutputsOperator(
            task_id="bad", chunks=[chunk.to_dict()], table="x; DROP TABLE y", sink="postgres", partition="p"
        ).execute(CONTEXT)
