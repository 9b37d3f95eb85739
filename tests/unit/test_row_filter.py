"""filter= on Parquet sources: copy and reference keep the same rows with the source's ids, counts are
exact, row groups are pruned by statistics, and a bad filter fails at parse time naming the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from airflow_batch_infer.chunk_input import open_chunk
from airflow_batch_infer.errors import StagingError
from airflow_batch_infer.row_filter import FilterError, parse_filter
from airflow_batch_infer.staging import Manifest, stage_parquet


def write_input(folder: Path) -> None:
    """Two files of ``key`` 0..5999 in row groups of 1000, ``x`` and a ``country`` cycling DE/FR/US."""
    folder.mkdir(parents=True)
    for i, (start, stop) in enumerate([(0, 3500), (3500, 6000)]):
        key = np.arange(start, stop)
        country = np.array(["DE", "FR", "US"])[key % 3]
        table = pa.table({"key": key, "x": (key * 0.5).astype(np.float32), "country": country})
        pq.write_table(table, folder / f"f{i}.parquet", row_group_size=1000)


def staged_rows(manifest: Manifest) -> tuple[pa.Table, int]:
    """Every row of the run's chunks as read by infer tasks, and the rows filtered while reading."""
    tables, filtered = [], 0
    for descriptor in manifest.chunks:
        chunk = open_chunk(descriptor, manifest)
        batches = list(chunk.iter_batches(400, list(manifest.schema)))
        tables.append(pa.Table.from_batches(batches, schema=chunk.schema))
        filtered += chunk.filtered_rows
    return pa.concat_tables(tables, promote_options="permissive"), filtered


@pytest.mark.parametrize(
    "row_filter",
    [
        "key >= 4200 AND country IN ('DE', 'US')",
        (pc.field("key") >= 4200) & pc.field("country").isin(["DE", "US"]),
    ],
    ids=["sql", "expression"],
)
def test_copy_and_reference_keep_the_same_rows_with_the_source_ids(tmp_path: Path, row_filter) -> None:
    write_input(tmp_path / "in")
    wanted = [k for k in range(4200, 6000) if k % 3 != 1]
    runs = {}
    for snapshot in ("copy", "reference"):
        manifest = stage_parquet(
            tmp_path / "in", tmp_path / snapshot, chunk_rows=700, snapshot=snapshot, row_filter=row_filter
        )
        table, filtered_at_read = staged_rows(manifest)
        runs[snapshot] = table.sort_by("row_id")
        assert runs[snapshot].column("key").to_pylist() == wanted
        # Generated ids are the source rows' positions, as without a filter.
        assert runs[snapshot].column("row_id").to_pylist() == wanted
        # Every source row is either kept or counted as filtered, at stage or as the chunks are read.
        assert len(wanted) + manifest.filtered_rows + filtered_at_read == 6000
        assert Manifest.load(tmp_path / snapshot).row_filter["columns"] == ["key", "country"]
        if snapshot == "copy":
            assert (manifest.total_rows, manifest.filtered_rows, filtered_at_read) == (len(wanted), 4800, 0)
        else:
            # Row groups 0-3 of f0 (keys < 4000... f0 ends at 3500) and group 0 of f1 (3500..4499 holds
            # 4200+) : only groups entirely below 4200 are pruned by their statistics.
            assert manifest.filtered_rows == 3500 + 0
            assert sum(c.rows for c in manifest.chunks) == 2500
            assert filtered_at_read == 2500 - len(wanted)
    assert (
        runs["copy"]
        .select(["row_id", "key", "x", "country"])
        .equals(
            runs["reference"]
            .select(["row_id", "key", "x", "country"])
            .cast(runs["copy"].select(["row_id", "key", "x", "country"]).schema)
        )
    )


def test_a_filter_on_a_column_not_staged_is_read_but_not_kept(tmp_path: Path) -> None:
    write_input(tmp_path / "in")
    for snapshot in ("copy", "reference"):
        manifest = stage_parquet(
            tmp_path / "in", tmp_path / snapshot, columns=["x"], snapshot=snapshot, row_filter="key < 10"
        )
        table, _ = staged_rows(manifest)
        assert table.column_names == ["row_id", "x"]
        assert table.column("row_id").to_pylist() == list(range(10))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("key >", "is not a valid condition"),
        ("lower(country) = 'de'", "'lower' is not allowed in a filter"),
        ("key > 1 LIMIT 3", "must be a single condition"),
        ("colour = 'red'", "names column 'colour', which the input lacks"),
        ("country > 3", "does not fit the input's columns"),
        ("key = NULL", "IS NULL"),
        ("key > 1; DROP TABLE t", "is not a valid condition"),
    ],
)
def test_a_bad_filter_fails_at_parse_time_naming_the_problem(tmp_path: Path, text: str, message: str) -> None:
    write_input(tmp_path / "in")
    with pytest.raises(FilterError, match=message):
        stage_parquet(tmp_path / "in", tmp_path / "run", row_filter=text)
    assert not (tmp_path / "run").exists()  # refused before anything was staged


def test_filter_is_refused_for_a_sql_source(tmp_path: Path) -> None:
    from airflow_batch_infer.sources.sql import SQLQuerySource
    from airflow_batch_infer.staging import stage_source

    source = SQLQuerySource("SELECT range AS key FROM range(10)", database=str(tmp_path / "db.duckdb"))
    with pytest.raises(StagingError, match=r"filter= is for Parquet sources.*WHERE clause"):
        stage_source(source, tmp_path / "run", snapshot="copy", row_filter="key > 1")


def test_null_comparisons_filter_the_row_out() -> None:
    schema = pa.schema([("a", pa.int64())])
    batch = pa.record_batch([pa.array([1, None, 3])], schema=schema)
    assert parse_filter("a <> 3", schema).mask(batch).to_pylist() == [True, False, False]
    assert parse_filter("a IS NULL OR a = 3", schema).mask(batch).to_pylist() == [False, True, True]


def test_a_smoke_run_filters_the_first_rows_of_a_copy(tmp_path: Path) -> None:
    from airflow_batch_infer.row_limits import LimitedSource
    from airflow_batch_infer.sources.parquet import ParquetSource
    from airflow_batch_infer.staging import stage_source

    write_input(tmp_path / "in")
    source = LimitedSource(ParquetSource(tmp_path / "in"), 1_000)
    manifest = stage_source(source, tmp_path / "run", snapshot="copy", row_filter="key < 500 OR key > 900")
    table, _ = staged_rows(manifest)
    assert table.column("row_id").to_pylist() == [*range(500), *range(901, 1_000)]
    assert manifest.filtered_rows == 1_000 - 599


def test_the_stage_operator_refuses_a_bad_filter_when_the_dag_is_parsed() -> None:
    from airflow_batch_infer.operators.stage import StageInputsOperator

    with pytest.raises(FilterError, match="'lower' is not allowed in a filter"):
        StageInputsOperator(task_id="stage", source="/data/in", filter="lower(country) = 'de'")
    # A templated filter is checked when stage runs, against the input's columns.
    StageInputsOperator(task_id="stage", source="/data/in", filter="{{ params.filter }}")
