"""Staging by reference: files pinned, chunks cut at row groups, rows read in place, changes refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_batch_infer.arrow_types import constant_array
from airflow_batch_infer.chunk_input import PinnedChunk, open_chunk
from airflow_batch_infer.chunk_sizing import AUTO_MAX_CHUNK_ROWS, AUTO_MIN_CHUNK_ROWS, plan_chunk_rows
from airflow_batch_infer.errors import SourceChangedError
from airflow_batch_infer.operators.infer import TritonInferenceOperator
from airflow_batch_infer.staging import Manifest, stage_parquet


def write_files(folder: Path, sizes: list[int], group_rows: int) -> None:
    """Files of ``key`` (0, 1, 2... across files), ``x`` and ``note`` in row groups of ``group_rows``."""
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(sizes):
        key = np.arange(start, start + n)
        table = pa.table({"key": key, "x": (key * 0.5).astype(np.float32), "note": [f"n{k}" for k in key]})
        pq.write_table(table, folder / f"f{i}.parquet", row_group_size=group_rows)
        start += n


def read_chunk(manifest: Manifest, index: int, columns: list[str] | None = None) -> pa.Table:
    chunk = open_chunk(manifest.chunks[index], manifest)
    return pa.Table.from_batches(list(chunk.iter_batches(700, columns or list(manifest.schema))))


def test_chunks_are_row_group_ranges_of_the_pinned_files_and_nothing_is_copied(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [2500, 4000, 1200], group_rows=1000)  # row groups of 1000 (and the rest)
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=3000)

    assert manifest.snapshot == "reference"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["manifest.json"]  # no chunk file
    # A chunk closes on the row group that brings it to 3000 rows: boundaries fall on row groups only.
    assert [c.rows for c in manifest.chunks] == [3500, 3000, 1200]
    assert [c.slices for c in manifest.chunks] == [
        [
            {"file": 0, "row_groups": [0, 3], "first_row": 0},
            {"file": 1, "row_groups": [0, 1], "first_row": 2500},
        ],
        [{"file": 1, "row_groups": [1, 4], "first_row": 3500}],
        [{"file": 2, "row_groups": [0, 2], "first_row": 6500}],
    ]
    assert [c.path for c in manifest.chunks] == ["", "", ""]
    files = manifest.files
    assert [f["rows"] for f in files] == [2500, 4000, 1200]
    assert [f["row_groups"] for f in files] == [[1000, 1000, 500], [1000] * 4, [1000, 200]]
    for pinned in files:
        stat = Path(pinned["path"]).stat()
        assert (pinned["size"], pinned["version"]) == (stat.st_size, str(stat.st_mtime_ns))
    assert Manifest.load(tmp_path / "run") == manifest

    table = pa.concat_tables(read_chunk(manifest, i) for i in range(3))
    assert table.num_rows == manifest.total_rows == 7700
    # Generated ids are the file's first id plus the row's offset: here they equal the keys.
    assert table.column("row_id").to_pylist() == list(range(7700))
    assert table.column("key").to_pylist() == list(range(7700))
    assert table.column("note").to_pylist()[2499:2502] == ["n2499", "n2500", "n2501"]
    assert [read_chunk(manifest, i).num_rows for i in range(3)] == [c.rows for c in manifest.chunks]


def test_row_ids_are_deterministic_and_the_same_as_a_copied_snapshot(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [1800, 900], group_rows=400)
    by_reference = [stage_parquet(tmp_path / "in", tmp_path / f"run{i}", chunk_rows=1000) for i in range(2)]
    copied = stage_parquet(tmp_path / "in", tmp_path / "copied", chunk_rows=1000, snapshot="copy")

    def ids_by_key(manifest: Manifest) -> dict[int, int]:
        rows = pa.concat_tables(
            read_chunk(manifest, i, ["row_id", "key"]) for i in range(len(manifest.chunks))
        )
        return dict(zip(rows.column("key").to_pylist(), rows.column("row_id").to_pylist(), strict=True))

    first = ids_by_key(by_reference[0])
    assert first == ids_by_key(by_reference[1]) == ids_by_key(copied)
    assert sorted(first.values()) == list(range(2700))


def test_a_file_changed_after_stage_fails_its_chunk_only(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [1000, 1000], group_rows=500)
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=1000)
    assert [c.slices[0]["file"] for c in manifest.chunks] == [0, 1]

    # The ETL rewrites the second file in place, with other rows.
    changed = tmp_path / "in" / "f1.parquet"
    pq.write_table(pa.table({"key": np.arange(5), "x": np.zeros(5, np.float32), "note": ["z"] * 5}), changed)
    with pytest.raises(SourceChangedError, match=r"f1\.parquet changed after the stage task pinned it"):
        open_chunk(manifest.chunks[1], manifest)
    assert read_chunk(manifest, 0).num_rows == 1000  # the other chunk still reads its pinned rows

    # Same size, new modification time: still another version.
    os.utime(tmp_path / "in" / "f0.parquet", ns=(1, 1))
    with pytest.raises(SourceChangedError, match="snapshot='copy'"):
        open_chunk(manifest.chunks[0], manifest)

    # The infer task fails at once, for good (AirflowFailException: no retry), before reaching a server.
    operator = TritonInferenceOperator(
        task_id="infer",
        chunk=manifest.chunks[1].to_dict(),
        model_name="risk_scorer",
        inputs={"features": ["x"]},
        server="127.0.0.1:9",
    )
    with pytest.raises(AirflowFailException, match="changed after the stage task pinned it"):
        operator.execute({})

    changed.unlink()
    with pytest.raises(SourceChangedError, match="it is gone"):
        open_chunk(manifest.chunks[1], manifest)


def test_stage_reads_footers_only(tmp_path: Path) -> None:
    """Rows are not read at stage: a file whose data pages are garbage stages, and fails when read."""
    write_files(tmp_path / "in", [3000], group_rows=1000)
    path = tmp_path / "in" / "f0.parquet"
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data[4 : len(data) - footer] = b"\xff" * (len(data) - footer - 4)  # every page, not the footer
    path.write_bytes(bytes(data))

    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=1000)

    assert [c.rows for c in manifest.chunks] == [1000, 1000, 1000]
    with pytest.raises((OSError, pa.ArrowException)):
        read_chunk(manifest, 0)


def test_markers_hidden_files_and_plain_subfolders_are_listed_as_a_dataset_would(tmp_path: Path) -> None:
    """Spark's ``_SUCCESS`` and ``_temporary/``, checksum files, and plain (not ``key=value``) subfolders."""
    write_files(tmp_path / "in", [1500], group_rows=1000)
    write_files(tmp_path / "in" / "2026" / "11", [500], group_rows=1000)
    (tmp_path / "in" / "_SUCCESS").write_text("")
    (tmp_path / "in" / ".f0.parquet.crc").write_bytes(b"\x00crc")
    write_files(tmp_path / "in" / "_temporary" / "0", [9], group_rows=1000)

    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=1000)

    assert [Path(f["path"]).relative_to(tmp_path / "in").as_posix() for f in manifest.files] == [
        "2026/11/f0.parquet",
        "f0.parquet",
    ]
    assert all(f["partition"] == {} for f in manifest.files)
    assert manifest.total_rows == 2000
    table = pa.concat_tables(read_chunk(manifest, i) for i in range(len(manifest.chunks)))
    assert sorted(table.column("key").to_pylist()) == sorted([*range(500), *range(1500)])
    assert table.column("row_id").to_pylist() == list(range(2000))


def test_a_flat_folder_is_staged_without_pyarrow_dataset(tmp_path: Path) -> None:
    """Listing and footers are enough: the stage task does not pay ``pyarrow.dataset``'s import (0.3 s,
    with pandas)."""
    write_files(tmp_path / "in", [1500, 700], group_rows=1000)
    script = (
        "import sys\n"
        "from airflow_batch_infer.staging import stage_parquet\n"
        f"manifest = stage_parquet({str(tmp_path / 'in')!r}, {str(tmp_path / 'run')!r}, chunk_rows=1000)\n"
        "print(manifest.total_rows, 'pyarrow.dataset' in sys.modules, 'pandas' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2200", "False", "False"]


def test_hive_partitions_by_reference_fill_their_columns_and_know_their_nulls(tmp_path: Path) -> None:
    for country, year, n in (("DE", 2025, 3), ("FR", 2026, 4)):
        folder = tmp_path / "in" / f"country={country}" / f"year={year}"
        folder.mkdir(parents=True)
        x = pa.array([1.0] * (n - 1) + [None]) if country == "FR" else pa.array([2.0] * n)
        pq.write_table(pa.table({"x": x, "y": pa.array(range(n), pa.int64())}), folder / "part.parquet")
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=3)

    assert [f["partition"] for f in manifest.files] == [
        {"country": "DE", "year": 2025},
        {"country": "FR", "year": 2026},
    ]
    first, second = (open_chunk(c, manifest) for c in manifest.chunks)
    assert isinstance(first, PinnedChunk)
    # Statistics prove "no null" per chunk: the output part keeps such columns REQUIRED.
    assert [(f.name, str(f.type), f.nullable) for f in first.schema] == [
        ("row_id", "int64", False),
        ("x", "double", False),
        ("y", "int64", False),
        ("country", "string", False),
        ("year", "int32", False),
    ]
    assert second.schema.field("x").nullable
    table = pa.concat_tables((read_chunk(manifest, i) for i in range(2)), promote_options="permissive")
    assert table.column("country").to_pylist() == ["DE"] * 3 + ["FR"] * 4
    assert table.column("year").to_pylist() == [2025] * 3 + [2026] * 4
    assert table.column("x").to_pylist()[-2:] == [1.0, None]


@pytest.mark.parametrize(
    ("value", "arrow_type"),
    [
        ("DE", pa.string()),
        ("DE", pa.large_string()),
        (2026, pa.int32()),
        (-7, pa.int64()),
        (1.5, pa.float64()),
        (None, pa.string()),
        (None, pa.int32()),
        (True, pa.bool_()),
    ],
)
def test_a_partition_value_repeated_is_what_arrow_would_make(value: object, arrow_type: pa.DataType) -> None:
    assert constant_array(value, arrow_type, 3).equals(pa.array([value] * 3, arrow_type))


def test_reading_a_hive_chunk_imports_no_pandas(tmp_path: Path) -> None:
    """The infer task fills partition columns from bytes: ``pa.scalar`` would import pandas (0.2 s)."""
    folder = tmp_path / "in" / "country=DE" / "year=2026"
    write_files(folder, [1200], group_rows=1000)
    stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=1000)
    script = (
        "import sys\n"
        "from airflow_batch_infer.chunk_input import open_chunk\n"
        "from airflow_batch_infer.staging import Manifest\n"
        f"manifest = Manifest.load({str(tmp_path / 'run')!r})\n"
        "chunk = open_chunk(manifest.chunks[0], manifest)\n"
        "batch = next(chunk.iter_batches(500, list(manifest.schema)))\n"
        "print(batch.column('country')[0], batch.column('year')[0], 'pandas' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["DE", "2026", "False"]


@pytest.mark.parametrize(
    ("rows", "slots", "expected"),
    [
        (10_000_000, 2, 5_000_000),  # one chunk per infer task that can run at once
        (10_000_000, 4, 2_500_000),
        (600_000, 8, AUTO_MIN_CHUNK_ROWS),  # small inputs: fewer, not tinier, chunks
        (100_000_000, 2, 25_000_000),  # large inputs: whole rounds of the slots, each chunk at most the max
        (130_000_000, 2, 21_666_667),
    ],
)
def test_auto_chunk_rows_follow_the_parallel_slots(rows: int, slots: int, expected: int) -> None:
    chunk_rows = plan_chunk_rows(rows, "auto", 1024, slots)
    assert chunk_rows == expected
    assert chunk_rows <= AUTO_MAX_CHUNK_ROWS
    assert plan_chunk_rows(rows, "auto", 3, slots) >= rows / 3  # max_map_length still wins


def test_auto_chunks_by_reference_balance_the_slots(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [600_000, 600_000], group_rows=50_000)
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows="auto", parallel_tasks=2)
    assert [c.rows for c in manifest.chunks] == [600_000, 600_000]
    with pytest.raises(ValueError, match="chunk_rows must be a number of rows or 'auto'"):
        stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows="many")


def test_a_null_hive_partition_reads_as_nulls(tmp_path: Path) -> None:
    for country in ("DE", "__HIVE_DEFAULT_PARTITION__"):
        folder = tmp_path / "in" / f"country={country}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"x": [1.0, 2.0]}), folder / "part.parquet")
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=10)

    chunk = open_chunk(manifest.chunks[0], manifest)
    assert chunk.schema.field("country").nullable
    assert read_chunk(manifest, 0).column("country").to_pylist() == ["DE", "DE", None, None]
