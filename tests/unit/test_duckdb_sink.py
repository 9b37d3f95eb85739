"""DuckDB sink: a partition is replaced atomically, never doubled, and misfits are named."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_batch_infer.sinks import SchemaMismatchError, get_sink
from airflow_batch_infer.sinks.base import parts_schema, qualified_table, validate_identifier


def parts(folder: Path, name: str, ids: list[list[int]], **extra: pa.Array) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(ids):
        columns = {
            "row_id": pa.array(chunk, pa.int64()),
            "score": pa.array([x / 100 for x in chunk], pa.float32()),
        }
        columns.update({k: v[: len(chunk)] for k, v in extra.items()})
        paths.append(folder / f"{name}-{i}.parquet")
        pq.write_table(pa.table(columns), paths[-1])
    return paths


def rejects(folder: Path, ids: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rejects.parquet"
    pq.write_table(
        pa.table(
            {"row_id": pa.array(ids, pa.int64()), "reject_reason": pa.array(["null"] * len(ids), pa.string())}
        ),
        path,
    )
    return [path]


def counts(database: Path, table: str) -> dict[str, int]:
    with duckdb.connect(str(database), read_only=True) as con:
        return dict(
            con.execute(f"SELECT batch_partition, count(*) FROM {table} GROUP BY 1 ORDER BY 1").fetchall()
        )


def test_replacing_a_partition_twice_leaves_the_same_rows(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    sink = get_sink("duckdb", table="scores", database=str(db))
    outs = parts(tmp_path / "a", "out", [[1, 2, 3], [4, 5]])

    first = sink.replace_partition("2026-11-21", outs, rejects(tmp_path / "a", [6]))
    second = sink.replace_partition("2026-11-21", outs, rejects(tmp_path / "a", [6]))
    sink.replace_partition("2026-11-22", outs[:1], rejects(tmp_path / "b", []))

    assert (first.rows, first.rejected, first.replaced) == (5, 1, 0)
    assert (second.rows, second.rejected, second.replaced) == (5, 1, 5)
    assert counts(db, "scores") == {"2026-11-21": 5, "2026-11-22": 3}
    assert counts(db, "scores_rejects") == {"2026-11-21": 1}
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute(
            "SELECT score FROM scores WHERE row_id = 4 AND batch_partition = '2026-11-21'"
        ).fetchone()[0] == pytest.approx(0.04)


def test_a_failure_midway_leaves_the_partition_as_it_was(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    sink = get_sink("duckdb", table="scores", database=str(db))
    sink.replace_partition("p", parts(tmp_path / "old", "out", [[1, 2]]), rejects(tmp_path / "old", []))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    new_outputs = parts(tmp_path / "new", "out", [[7, 8, 9]])

    with pytest.raises(duckdb.Error):
        sink.replace_partition("p", new_outputs, [broken])

    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT row_id FROM scores ORDER BY 1").fetchall() == [(1,), (2,)]


def test_an_existing_table_that_does_not_fit_is_named(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("CREATE TABLE scores (batch_partition VARCHAR, row_id BIGINT, score VARCHAR)")
        con.execute("CREATE TABLE other (batch_partition VARCHAR, row_id BIGINT)")
    outs = parts(tmp_path / "a", "out", [[1]])
    with pytest.raises(
        SchemaMismatchError, match="Column 'score' of table scores is VARCHAR but the outputs hold FLOAT"
    ):
        get_sink("duckdb", table="scores", database=str(db)).replace_partition(
            "p", outs, rejects(tmp_path, [])
        )
    with pytest.raises(SchemaMismatchError, match="Table other has no column 'score' \\(FLOAT\\)"):
        get_sink("duckdb", table="other", database=str(db)).replace_partition(
            "p", outs, rejects(tmp_path, [])
        )
    with pytest.raises(SchemaMismatchError, match=r"does not exist .* create_table is off"):
        get_sink("duckdb", table="absent", database=str(db), create_table=False).replace_partition(
            "p", outs, rejects(tmp_path, [])
        )


@pytest.mark.parametrize("name", ["scores; DROP TABLE x", "1scores", 'a"b', "a.b.c", "", "scores\n"])
def test_identifiers_from_params_are_validated(name: str) -> None:
    with pytest.raises(ValueError, match="Invalid table name"):
        qualified_table(name)


def test_identifiers_are_quoted() -> None:
    assert qualified_table("analytics.scores") == '"analytics"."scores"'
    with pytest.raises(ValueError, match="Invalid partition column"):
        get_sink("duckdb", table="t", partition_column="part-col")
    assert validate_identifier("_ok1") == "_ok1"


@pytest.mark.parametrize("key", ["2026-11-21\n", "2026-11-21\n\n", "../2026", "", "2026 11 21"])
def test_a_partition_key_must_be_plain_text_whole(key: str) -> None:
    from airflow_batch_infer.partition import validate_partition

    with pytest.raises(ValueError, match="is not valid"):
        validate_partition(key)
    assert validate_partition("2026-11-21") == "2026-11-21"


def test_parts_may_differ_in_nullability_but_not_in_types(tmp_path: Path) -> None:
    # A part's column is REQUIRED where its chunk held no nulls: parts of one run may differ so.
    required = pa.schema(
        [pa.field("row_id", pa.int64(), nullable=False), pa.field("note", pa.string(), False)]
    )
    optional = pa.schema([pa.field("row_id", pa.int64(), nullable=False), pa.field("note", pa.string())])
    first, second, odd = tmp_path / "p0.parquet", tmp_path / "p1.parquet", tmp_path / "p2.parquet"
    pq.write_table(pa.table({"row_id": [1, 2], "note": ["a", "b"]}, schema=required), first)
    pq.write_table(pa.table({"row_id": [3, 4], "note": ["c", None]}, schema=optional), second)
    pq.write_table(pa.table({"row_id": [5], "note": [1.5]}), odd)

    assert parts_schema([first, second]) == pa.schema([("row_id", pa.int64()), ("note", pa.string())])
    with pytest.raises(SchemaMismatchError, match=r"p2\.parquet"):
        parts_schema([first, odd])

    db = tmp_path / "w.duckdb"
    result = get_sink("duckdb", table="notes", database=str(db)).replace_partition(
        "p", [first, second], rejects(tmp_path, [])
    )
    assert result.rows == 4
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT row_id, note FROM notes ORDER BY row_id").fetchall() == [
            (1, "a"),
            (2, "b"),
            (3, "c"),
            (4, None),
        ]


def test_a_partition_larger_than_the_memory_limit_still_lands_whole(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    ids = [list(range(i * 400_000, (i + 1) * 400_000)) for i in range(3)]
    note = pa.array([f"row {i} of a wide text column" for i in range(400_000)])
    outs = parts(tmp_path / "a", "out", ids, note=note)
    sink = get_sink("duckdb", table="scores", database=str(db), memory_limit="32MB")

    result = sink.replace_partition("2026-11-21", outs, rejects(tmp_path / "a", []))

    assert (result.rows, result.replaced) == (1_200_000, 0)
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute(
            "SELECT count(DISTINCT row_id), min(row_id), max(row_id) FROM scores"
        ).fetchone() == (
            1_200_000,
            0,
            1_199_999,
        )
