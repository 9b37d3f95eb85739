"""Staging: chunk files, row ids, manifest, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_batch_infer.chunk_input import open_chunk
from airflow_batch_infer.chunk_sizing import plan_chunk_rows
from airflow_batch_infer.errors import StagingError
from airflow_batch_infer.parquet_files import parquet_writer
from airflow_batch_infer.staging import Manifest, check_inside, run_directory, stage_parquet
from tests.conftest import column_layouts, definition_levels


def write_files(folder: Path, sizes: list[int]) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(sizes):
        values = np.arange(start, start + n)
        pq.write_table(pa.table({"key": values, "x": values * 0.5}), folder / f"f{i}.parquet")
        start += n
    return start


def read_all_chunks(manifest: Manifest) -> pa.Table:
    """Every staged row, read as the infer tasks read them (chunk files, or pinned row groups)."""
    columns = list(manifest.schema)
    tables = [
        pa.Table.from_batches(list(open_chunk(c, manifest).iter_batches(1_000, columns)))
        for c in manifest.chunks
    ]
    return pa.concat_tables(tables, promote_options="permissive")


def test_chunks_hold_every_row_once_with_sequential_ids(tmp_path: Path) -> None:
    total = write_files(tmp_path / "in", [3000, 4500, 3000])
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=4000, snapshot="copy")

    assert [c.rows for c in manifest.chunks] == [4000, 4000, 2500]
    assert manifest.total_rows == total == 10_500
    table = read_all_chunks(manifest)
    assert table.column("row_id").to_pylist() == list(range(total))
    assert sorted(table.column("key").to_pylist()) == list(range(total))
    assert [c.first_row for c in manifest.chunks] == [0, 4000, 8000]
    for chunk in manifest.chunks:
        assert pq.read_metadata(chunk.path).num_rows == chunk.rows
        assert chunk.bytes == Path(chunk.path).stat().st_size
    on_disk = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert on_disk["total_rows"] == total
    assert Manifest.load(tmp_path / "run").chunks == manifest.chunks


def test_chunk_files_are_laid_out_for_a_fast_read_and_parts_for_any_reader(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    n = 5000
    table = pa.table(
        {
            "key": np.arange(n) * 3 + 1_000_000,
            "x": np.random.default_rng(0).standard_normal(n).astype(np.float32),
            "note": pa.array(["a", "b"] * (n // 2)),
        }
    )
    pq.write_table(table, folder / "f.parquet")
    manifest = stage_parquet(folder, tmp_path / "run", chunk_rows=n, snapshot="copy")
    chunk = column_layouts(manifest.chunks[0].path)
    # Ids delta-encoded and features plain, both uncompressed: the infer task decodes them fastest.
    assert chunk["row_id"] == ("UNCOMPRESSED", {"RLE", "DELTA_BINARY_PACKED"})
    assert chunk["key"] == ("UNCOMPRESSED", {"RLE", "DELTA_BINARY_PACKED"})
    assert chunk["x"] == ("UNCOMPRESSED", {"RLE", "PLAIN"})
    # Columns without nulls are REQUIRED: no definition levels to decode.
    assert definition_levels(manifest.chunks[0].path) == {"row_id": 0, "key": 0, "x": 0, "note": 0}
    staged = pq.read_table(manifest.chunks[0].path, columns=["key", "x", "note"])
    assert staged.equals(table.cast(staged.schema))

    # Output parts are published as they are (s3_parquet, athena, redshift): plain values and Snappy, or
    # plain values alone (a part on local disk), which every Parquet reader knows.
    for compress, codec in ((True, "SNAPPY"), (False, "UNCOMPRESSED")):
        part = tmp_path / f"part-{codec}.parquet"
        writer = parquet_writer(part, table.schema, compress=compress)
        writer.write_table(table)
        writer.close()
        layouts = column_layouts(part)
        assert layouts["key"] == (codec, {"RLE", "PLAIN"})
        assert layouts["x"] == ("UNCOMPRESSED", {"RLE", "PLAIN"})
        assert layouts["note"][0] == codec
        assert pq.read_table(part).equals(table)


def test_a_column_whose_first_nulls_come_late_in_a_chunk_keeps_every_value(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    # The first file has no nulls, so a chunk opens with "x" REQUIRED; the second brings nulls into it.
    pq.write_table(pa.table({"key": [0, 1, 2], "x": [0.5, 1.5, 2.5]}), folder / "f0.parquet")
    pq.write_table(pa.table({"key": [3, 4, 5], "x": [None, 4.5, None]}), folder / "f1.parquet")

    one_chunk = stage_parquet(folder, tmp_path / "one", chunk_rows=100, snapshot="copy")
    assert [c.rows for c in one_chunk.chunks] == [6]
    path = one_chunk.chunks[0].path
    assert definition_levels(path) == {"row_id": 0, "key": 0, "x": 1}
    staged = pq.read_table(path)
    assert staged.column("key").to_pylist() == [0, 1, 2, 3, 4, 5]
    assert staged.column("x").to_pylist() == [0.5, 1.5, 2.5, None, 4.5, None]
    assert pq.read_metadata(path).num_rows == 6
    assert sorted(p.name for p in Path(path).parent.iterdir()) == ["chunk-00000.parquet"]  # no temp left

    two_chunks = stage_parquet(folder, tmp_path / "two", chunk_rows=3, snapshot="copy")
    assert [definition_levels(c.path)["x"] for c in two_chunks.chunks] == [0, 1]
    values = [v for c in two_chunks.chunks for v in pq.read_table(c.path).column("x").to_pylist()]
    assert values == [0.5, 1.5, 2.5, None, 4.5, None]


def test_chunk_count_stays_within_max_map_length(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [1000])
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=10, max_chunks=7, snapshot="copy")
    assert len(manifest.chunks) <= 7
    assert sum(c.rows for c in manifest.chunks) == 1000
    assert plan_chunk_rows(1000, 10, 7) == 143


@pytest.mark.parametrize("snapshot", ["reference", "copy"])
def test_column_subset_and_own_row_id(tmp_path: Path, snapshot: str) -> None:
    write_files(tmp_path / "in", [50])
    manifest = stage_parquet(
        tmp_path / "in", tmp_path / "run", columns=["x"], row_id_column="key", snapshot=snapshot
    )
    table = read_all_chunks(manifest)
    assert table.column_names == ["key", "x"]
    assert manifest.row_id_column == "key"
    assert manifest.chunks[0].first_row == -1


def test_missing_column_is_named(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [10])
    with pytest.raises(StagingError, match=r"\['nope'\] are not in the input"):
        stage_parquet(tmp_path / "in", tmp_path / "run", columns=["x", "nope"])
    with pytest.raises(StagingError, match="Row id column 'id'"):
        stage_parquet(tmp_path / "in", tmp_path / "run", row_id_column="id")


def test_existing_row_id_column_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"row_id": [5, 6], "x": [1.0, 2.0]}), tmp_path / "in" / "a.parquet")
    with pytest.raises(StagingError, match="already has a column 'row_id'"):
        stage_parquet(tmp_path / "in", tmp_path / "run")


@pytest.mark.parametrize("snapshot", ["reference", "copy"])
def test_hive_partition_folders_become_columns(tmp_path: Path, snapshot: str) -> None:
    for country, n in (("DE", 3), ("FR", 4)):
        folder = tmp_path / "in" / f"country={country}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"x": np.ones(n)}), folder / "part.parquet")
    table = read_all_chunks(stage_parquet(tmp_path / "in", tmp_path / "run", snapshot=snapshot))
    assert sorted(table.column("country").to_pylist()) == ["DE"] * 3 + ["FR"] * 4


def test_restaging_replaces_the_snapshot(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [100])
    stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=10, snapshot="copy")
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=50, snapshot="copy")
    assert len(list((tmp_path / "run" / "chunks").glob("*.parquet"))) == len(manifest.chunks) == 2


def test_not_parquet_and_missing_input(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data.parquet").write_text("id,x\n1,2\n")
    with pytest.raises(StagingError, match="Cannot read"):
        stage_parquet(tmp_path / "in", tmp_path / "run")
    with pytest.raises(StagingError, match="does not exist"):
        stage_parquet(tmp_path / "absent", tmp_path / "run")


def test_paths_outside_the_run_are_refused(tmp_path: Path) -> None:
    run = run_directory(tmp_path, "dag", "2026-11-21", "manual__2026-11-21T00:00:00+00:00")
    assert run.parts[-1].startswith("manual__2026-11-21T00_00_00_00_00-")
    # Run ids that read the same once made safe for a path still get folders of their own.
    assert run != run_directory(tmp_path, "dag", "2026-11-21", "manual__2026-11-21T00_00_00_00_00")
    assert run == run_directory(tmp_path, "dag", "2026-11-21", "manual__2026-11-21T00:00:00+00:00")
    assert check_inside(run / "chunks" / "c.parquet", run) == (run / "chunks" / "c.parquet").resolve()
    with pytest.raises(StagingError, match="outside the staging folder"):
        check_inside(run / ".." / ".." / "other" / "c.parquet", run)


def test_files_whose_schemas_disagree_are_named(tmp_path: Path) -> None:
    (tmp_path / "types").mkdir()
    pq.write_table(pa.table({"key": [1, 2], "x": [0.5, 1.5]}), tmp_path / "types" / "a.parquet")
    pq.write_table(pa.table({"key": [3], "x": ["1.5"]}), tmp_path / "types" / "b.parquet")
    with pytest.raises(
        StagingError, match=r"Column 'x' is string in .*b\.parquet but double in the first file"
    ):
        stage_parquet(tmp_path / "types", tmp_path / "run")

    (tmp_path / "missing").mkdir()
    pq.write_table(pa.table({"key": [1], "x": [0.5]}), tmp_path / "missing" / "a.parquet")
    pq.write_table(pa.table({"key": [2]}), tmp_path / "missing" / "b.parquet")
    with pytest.raises(StagingError, match=r"b\.parquet lacks column\(s\) \['x'\]"):
        stage_parquet(tmp_path / "missing", tmp_path / "run")


def test_an_empty_input_is_refused_by_the_stage_task(tmp_path: Path) -> None:
    from airflow_batch_infer.operators.stage import StageInputsOperator

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"x": pa.array([], pa.float64())}), tmp_path / "in" / "empty.parquet")
    operator = StageInputsOperator(
        task_id="stage", source=str(tmp_path / "in"), staging_root=str(tmp_path / "s")
    )
    with pytest.raises(ValueError, match="has no rows: nothing to score"):
        operator.execute({"run_id": "manual__1", "partition_key": "2026-11-21"})


@pytest.mark.parametrize("snapshot", ["reference", "copy"])
def test_duplicate_or_null_row_ids_are_refused(tmp_path: Path, snapshot: str) -> None:
    (tmp_path / "dups").mkdir()
    pq.write_table(pa.table({"tx": [1, 2, 3, 2, 2], "x": [0.0] * 5}), tmp_path / "dups" / "a.parquet")
    with pytest.raises(StagingError, match=r"Row id column 'tx' is not unique: 2 \(3 times\)"):
        stage_parquet(
            tmp_path / "dups", tmp_path / "run", row_id_column="tx", chunk_rows=2, snapshot=snapshot
        )

    (tmp_path / "nulls").mkdir()
    pq.write_table(pa.table({"tx": [1, None, 3], "x": [0.0] * 3}), tmp_path / "nulls" / "a.parquet")
    with pytest.raises(StagingError, match="has 1 null"):
        stage_parquet(tmp_path / "nulls", tmp_path / "run", row_id_column="tx", snapshot=snapshot)
