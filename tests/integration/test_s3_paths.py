"""Staging and persisting on S3 (a local moto_server) through a real ``aws`` connection."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pendulum
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from airflow_batch_infer import storage
from airflow_batch_infer.chunk_input import open_chunk
from airflow_batch_infer.errors import SourceChangedError, StagingError
from airflow_batch_infer.operators.persist import IncompleteRunError, PersistOutputsOperator
from airflow_batch_infer.operators.stage import StageInputsOperator
from airflow_batch_infer.parquet_files import open_parquet
from airflow_batch_infer.staging import Manifest, check_inside, run_directory, stage_parquet
from tests.aws_fixtures import aws_client, aws_conn, bucket, moto_endpoint, s3_url, write_run_parts

__all__ = ["aws_conn", "bucket", "moto_endpoint"]  # fixtures used by name

CONTEXT = {"run_id": "manual__2026-11-21", "logical_date": pendulum.datetime(2026, 11, 21, tz="UTC")}


def stage_day_on_s3(bucket: str, **options: Any) -> list[dict[str, Any]]:
    """Stage a day of 2,500 rows (ids 1000–3499) put on S3, copied into 1,000-row chunks on S3."""
    put_parquet(
        bucket, "etl/day.parquet", pa.table({"transaction_id": np.arange(1000, 3500), "f": np.ones(2500)})
    )
    stage = StageInputsOperator(
        task_id="stage",
        source=f"s3://{bucket}/etl",
        source_conn_id="aws_test",
        staging_root=f"s3://{bucket}/staging",
        staging_conn_id="aws_test",
        chunk_rows=1000,
        row_id_column="transaction_id",
        partition="2026-11-21",
        snapshot="copy",
        **options,
    )
    return stage.execute(CONTEXT)


def persist_into(database: Path, chunks: list[dict[str, Any]]) -> PersistOutputsOperator:
    """The persist task of a staged run, into table ``scores`` (partition 2026-11-21) of a DuckDB file."""
    return PersistOutputsOperator(
        task_id="persist",
        chunks=chunks,
        table="scores",
        sink_options=json.dumps({"database": str(database)}),
        partition="2026-11-21",
    )


def put_parquet(bucket: str, key: str, table: pa.Table, row_group_rows: int | None = None) -> int:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_rows)
    aws_client("s3").put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
    return len(buffer.getvalue())


def keys(bucket: str, prefix: str) -> list[str]:
    listed = aws_client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def put_hive_input(bucket: str, row_group_rows: int | None = None) -> int:
    """Two hive folders (``country=DE``, ``country=FR``) of 20,000 rows each under ``in/``: ``key``, ``x``
    and an incompressible ``blob`` that is never read. Returns the bytes put."""
    rng = np.random.default_rng(3)
    sizes = 0
    for country, start in (("DE", 0), ("FR", 20_000)):
        ids = np.arange(start, start + 20_000)
        blob = pa.array([rng.bytes(200) for _ in ids], pa.binary())
        table = pa.table({"key": ids, "x": ids * 0.5, "blob": blob})
        sizes += put_parquet(bucket, f"in/country={country}/part.parquet", table, row_group_rows)
    return sizes


def ranged_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the ranged GETs s3fs makes from now on (the list fills as they happen)."""
    fetched: list[int] = []
    original = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(
        s3fs.core.S3File,
        "_fetch_range",
        lambda self, start, end: fetched.append(end - start) or original(self, start, end),
    )
    return fetched


def test_hive_folders_on_s3_are_staged_reading_only_the_columns_asked_for(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = put_hive_input(bucket)
    fetched = ranged_reads(monkeypatch)

    run = run_directory(s3_url(bucket, "staging"), "dag", "2026-11-21", "manual__1")
    run_key = run.split(f"@{bucket}/", 1)[1]
    assert run_key.startswith("staging/dag/2026-11-21/manual__1-")
    manifest = stage_parquet(
        s3_url(bucket, "in"), run, chunk_rows=15_000, columns=["x", "country"], snapshot="copy"
    )

    assert sizes > 8_000_000
    assert sum(fetched) < sizes / 10, f"read {sum(fetched):,} bytes of {sizes:,} for 2 small columns"
    assert [c.rows for c in manifest.chunks] == [15_000, 15_000, 10_000]
    assert all(c.path.startswith(f"{run}/chunks/") for c in manifest.chunks)
    assert keys(bucket, "staging/") == [
        *(f"{run_key}/chunks/chunk-0000{i}.parquet" for i in range(3)),
        f"{run_key}/manifest.json",
    ]
    loaded = Manifest.load(run)
    assert loaded.chunks == manifest.chunks
    staged = pa.concat_tables(open_parquet(c.path).read() for c in loaded.chunks)
    assert staged.column_names == ["row_id", "x", "country"]
    assert sorted(staged.column("x").to_pylist()) == [i * 0.5 for i in range(40_000)]
    assert staged.group_by("country").aggregate([("x", "count")]).sort_by("country").to_pydict() == {
        "x_count": [20_000, 20_000],
        "country": ["DE", "FR"],
    }
    assert storage.size(loaded.chunks[0].path) == loaded.chunks[0].bytes

    restaged = stage_parquet(s3_url(bucket, "in"), run, chunk_rows=30_000, columns=["x"], snapshot="copy")
    assert len(restaged.chunks) == 2
    assert len([k for k in keys(bucket, "staging/") if "/chunks/" in k]) == 2


def test_objects_on_s3_are_pinned_by_reference_and_read_in_place(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = put_hive_input(bucket, row_group_rows=5_000)
    fetched = ranged_reads(monkeypatch)

    run = run_directory(s3_url(bucket, "staging"), "dag", "2026-11-21", "manual__2")
    manifest = stage_parquet(s3_url(bucket, "in"), run, chunk_rows=15_000, columns=["x", "country"])

    # Footers only (a ranged read or two a file, of the file's last 64 KiB), and nothing written but the
    # manifest.
    assert len(fetched) <= 4, fetched
    assert sum(fetched) < sizes / 20, f"read {sum(fetched):,} bytes of {sizes:,} at stage"
    assert keys(bucket, "staging/") == [f"{run.split(f'@{bucket}/', 1)[1]}/manifest.json"]
    assert [c.rows for c in manifest.chunks] == [15_000, 15_000, 10_000]
    assert [f["path"] for f in manifest.files] == [
        f"s3://aws_test@{bucket}/in/country={country}/part.parquet" for country in ("DE", "FR")
    ]
    etag = aws_client("s3").head_object(Bucket=bucket, Key="in/country=DE/part.parquet")["ETag"]
    assert manifest.files[0]["version"] == etag.strip('"')

    loaded = Manifest.load(run)
    read = [open_chunk(c, loaded) for c in loaded.chunks]
    rows = pa.concat_tables(
        pa.Table.from_batches(list(chunk.iter_batches(4_096, ["row_id", "x", "country"]))) for chunk in read
    )
    assert rows.column("row_id").to_pylist() == list(range(40_000))
    assert rows.column("x").to_pylist() == [i * 0.5 for i in range(40_000)]
    assert rows.column("country").to_pylist() == ["DE"] * 20_000 + ["FR"] * 20_000

    # The ETL overwrites an object: the chunks that read it fail, saying so; the others still read.
    put_parquet(bucket, "in/country=FR/part.parquet", pa.table({"key": [1], "x": [0.5], "blob": [b"x"]}))
    with pytest.raises(SourceChangedError, match=r"country=FR/part\.parquet changed after the stage task"):
        open_chunk(loaded.chunks[2], loaded)
    assert open_chunk(loaded.chunks[0], loaded).num_rows == 15_000


def test_paths_on_s3_stay_inside_their_run(bucket: str) -> None:
    run = run_directory(s3_url(bucket, "staging"), "dag", "p", "run:1")
    assert run.startswith(f"s3://aws_test@{bucket}/staging/dag/p/run_1-")
    inside = f"{run}/chunks/chunk-00000.parquet"
    assert check_inside(inside, run) == inside
    with pytest.raises(StagingError, match="outside the staging folder"):
        check_inside(f"{run}/../other/chunks/chunk-00000.parquet", run)
    with pytest.raises(StagingError, match="does not exist"):
        stage_parquet(s3_url(bucket, "absent"), run)


def test_a_run_staged_on_s3_is_persisted_once_however_often_it_is_persisted(bucket: str, tmp_path) -> None:
    chunks = stage_day_on_s3(bucket)
    assert [c["rows"] for c in chunks] == [1000, 1000, 500]
    run_dir = chunks[0]["run_dir"]
    assert run_dir.startswith(f"s3://aws_test@{bucket}/staging/")

    manifest = Manifest.load(run_dir)
    ids = [open_parquet(c.path).read().column("transaction_id").to_pylist() for c in manifest.chunks]
    write_run_parts(run_dir, ids[:2])  # the third chunk's infer task has not run
    database = tmp_path / "w.duckdb"
    persist = persist_into(database, chunks)
    with pytest.raises(IncompleteRunError, match="chunk 2 has no output part"):
        persist.execute(CONTEXT)
    assert not database.exists()

    write_run_parts(run_dir, ids, rejected=frozenset({1000, 3499}))
    first = persist.execute(CONTEXT)
    again = persist.execute(CONTEXT)

    assert (first["rows"], first["rejected"], first["replaced"]) == (2498, 2, 0)
    assert (again["rows"], again["rejected"], again["replaced"]) == (2498, 2, 2498)
    with duckdb.connect(str(database), read_only=True) as con:
        rows = con.execute(
            "SELECT count(*), count(DISTINCT row_id), min(row_id), max(row_id) FROM scores"
        ).fetchone()
        assert rows == (2498, 2498, 1001, 3498)
        assert con.execute("SELECT row_id FROM scores_rejects ORDER BY 1").fetchall() == [(1000,), (3499,)]
    summary = json.loads(storage.read_text(f"{run_dir}/summary.json"))
    assert (summary["rows"], summary["total_rows"]) == (2498, 2500)
