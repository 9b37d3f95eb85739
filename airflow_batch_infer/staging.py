"""Staging: one snapshot of the input per run, as chunk files plus a manifest, and the run's folder layout.

A run's folder holds::

    manifest.json              written last: its presence means the snapshot is complete
    chunks/chunk-00000.parquet the input rows, with a row id, ``chunk_rows`` rows each
    outputs/part-00000.parquet one per chunk, written by the infer task
    rejects/part-00000.parquet rows set aside, with a reason
    summary.json               written by the persist task: what was committed where
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
SUMMARY = "summary.json"  # written by the persist task once the partition is committed
DEFAULT_ROW_ID_COLUMN = "row_id"
DEFAULT_MAX_CHUNKS = 1024  # Airflow's [core] max_map_length default
_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


class StagingError(ValueError):
    """The input cannot be staged; the message says what is wrong with it."""


@dataclass(frozen=True)
class ChunkDescriptor:
    """What a mapped infer task gets through XCom: where its chunk is, never the rows.

    :param run_dir: the run's staging folder.
    :param index: chunk number, from 0.
    :param path: the chunk's Parquet file.
    :param rows: rows in the chunk.
    :param bytes: size of the chunk file.
    :param first_row: row id of the chunk's first row when ids are generated (else -1).
    """

    run_dir: str
    index: int
    path: str
    rows: int
    bytes: int
    first_row: int = -1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkDescriptor:
        return cls(**data)


@dataclass
class Manifest:
    """The snapshot's description, stored as ``manifest.json`` in the run folder.

    :param run_dir: the run's staging folder.
    :param source: where the rows came from.
    :param row_id_column: column that identifies each row in outputs and rejects.
    :param total_rows: rows staged.
    :param chunk_rows: rows per chunk (the last may hold fewer).
    :param schema: column name → Arrow type, as text.
    :param chunks: one descriptor per chunk file.
    """

    run_dir: str
    source: str
    row_id_column: str
    total_rows: int
    chunk_rows: int
    schema: dict[str, str]
    chunks: list[ChunkDescriptor] = field(default_factory=list)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["chunks"] = [c.to_dict() for c in self.chunks]
        return data

    @classmethod
    def load(cls, run_dir: str | Path) -> Manifest:
        path = Path(run_dir) / MANIFEST
        if not path.exists():
            raise StagingError(f"No manifest at {path}: the stage task has not completed for this run.")
        data = json.loads(path.read_text())
        data["chunks"] = [ChunkDescriptor.from_dict(c) for c in data["chunks"]]
        return cls(**data)


def safe_name(text: str) -> str:
    """A folder name made of ``text`` (a run id, a partition key) with unsafe characters replaced."""
    cleaned = _SAFE.sub("_", text).strip("._")
    return cleaned or "_"


def run_directory(staging_root: str | Path, dag_id: str, partition: str, run_id: str) -> Path:
    """The folder of one run: ``<staging_root>/<dag_id>/<partition>/<run_id>``."""
    return Path(staging_root) / safe_name(dag_id) / safe_name(partition) / safe_name(run_id)


def output_part_path(run_dir: str | Path, index: int) -> Path:
    """Where the infer task writes the outputs of chunk ``index``."""
    return Path(run_dir) / "outputs" / f"part-{index:05d}.parquet"


def rejects_part_path(run_dir: str | Path, index: int) -> Path:
    """Where the infer task writes the rows of chunk ``index`` that it set aside."""
    return Path(run_dir) / "rejects" / f"part-{index:05d}.parquet"


def check_inside(path: str | Path, root: str | Path) -> Path:
    """Return ``path`` resolved, refusing any path outside ``root`` (a chunk from another run, say)."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        raise StagingError(f"Path {resolved} is outside the staging folder {base}; refusing to use it.")
    return resolved


def atomic_target(final: Path) -> Path:
    """A temporary sibling of ``final`` to write into before ``os.replace`` moves it in place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")


def parquet_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    """A writer for the run's own files (chunks, outputs, rejects), tuned for write-once, read-once data.

    Dictionary encoding is kept for text columns only: on numeric columns of mostly unique values it
    costs several times the CPU of the write for nothing. LZ4 decodes faster than Snappy at the same size.
    """
    text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    return pq.ParquetWriter(path, schema, compression="lz4", use_dictionary=text or False)


def open_parquet(path: str | Path) -> pq.ParquetFile:
    """Open a run file for streaming: without pre-buffering, reading holds one row group, not the file."""
    return pq.ParquetFile(path, pre_buffer=False)


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = atomic_target(path)
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def open_source(source: str | Path | Sequence[str | Path], columns: Sequence[str] | None) -> ds.Dataset:
    """Open Parquet files or folders (hive partition folders understood) as one dataset."""
    paths = [str(source)] if isinstance(source, str | Path) else [str(p) for p in source]
    for path in paths:
        if not Path(path).exists():
            raise StagingError(f"Input {path} does not exist.")
    try:
        dataset = ds.dataset(paths if len(paths) > 1 else paths[0], format="parquet", partitioning="hive")
    except (pa.ArrowInvalid, OSError) as err:
        raise StagingError(f"Cannot read {source} as Parquet: {err}") from err
    if columns:
        missing = [c for c in columns if c not in dataset.schema.names]
        if missing:
            raise StagingError(
                f"Column(s) {missing} are not in the input {source}; columns present: {dataset.schema.names}."
            )
    return dataset


def plan_chunk_rows(total_rows: int, chunk_rows: int, max_chunks: int) -> int:
    """Rows per chunk: ``chunk_rows``, raised as needed so the chunk count stays within ``max_chunks``."""
    if chunk_rows <= 0:
        raise StagingError(f"chunk_rows must be positive, got {chunk_rows}.")
    return max(chunk_rows, math.ceil(total_rows / max_chunks)) if total_rows else chunk_rows


def _batches(dataset: ds.Dataset, columns: Sequence[str] | None) -> Iterator[pa.RecordBatch]:
    scanner = dataset.scanner(columns=list(columns) if columns else None, batch_size=65_536)
    try:
        yield from scanner.to_batches()
    except pa.ArrowInvalid as err:
        raise StagingError(f"Cannot read the input: {err}") from err


def stage_parquet(
    source: str | Path | Sequence[str | Path],
    run_dir: str | Path,
    *,
    chunk_rows: int = 250_000,
    columns: Sequence[str] | None = None,
    row_id_column: str | None = None,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
) -> Manifest:
    """Snapshot Parquet input into chunk files and write the manifest last.

    Rows stream through in record batches, so memory does not grow with the input. Staging the same
    run again replaces the earlier snapshot.

    :param source: a Parquet file, a folder of them (hive partitions understood), or a list of paths.
    :param run_dir: the run's staging folder (see :func:`run_directory`).
    :param chunk_rows: rows per chunk; raised if the input would need more than ``max_chunks`` chunks.
    :param columns: columns to keep (all when ``None``); the row id column is always kept.
    :param row_id_column: the input's own unique row id column; when ``None`` a ``row_id`` column of
        sequential int64 ids is added.
    :param max_chunks: upper bound on the chunk count (Airflow's ``max_map_length``).
    """
    run_dir = Path(run_dir)
    dataset = open_source(source, columns)
    if row_id_column and row_id_column not in dataset.schema.names:
        raise StagingError(
            f"Row id column {row_id_column!r} is not in the input; columns present: {dataset.schema.names}."
        )
    keep = list(columns) if columns else list(dataset.schema.names)
    if row_id_column and row_id_column not in keep:
        keep.insert(0, row_id_column)
    generated_ids = row_id_column is None
    id_column = row_id_column or DEFAULT_ROW_ID_COLUMN
    if generated_ids and id_column in keep:
        raise StagingError(
            f"The input already has a column {id_column!r}: pass row_id_column={id_column!r} to use it "
            "as the row id, or leave it out of the columns staged."
        )

    total_rows = dataset.count_rows()
    rows_per_chunk = plan_chunk_rows(total_rows, chunk_rows, max_chunks)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    chunk_dir = run_dir / "chunks"
    chunk_dir.mkdir(parents=True)

    chunks: list[ChunkDescriptor] = []
    writer: pq.ParquetWriter | None = None
    written_in_chunk = 0
    next_row_id = 0
    schema: pa.Schema | None = None

    def close_chunk() -> None:
        nonlocal writer, written_in_chunk
        if writer is None:
            return
        writer.close()
        index = len(chunks)
        path = chunk_dir / f"chunk-{index:05d}.parquet"
        first = next_row_id - written_in_chunk if generated_ids else -1
        chunks.append(
            ChunkDescriptor(str(run_dir), index, str(path), written_in_chunk, path.stat().st_size, first)
        )
        writer, written_in_chunk = None, 0

    for batch in _batches(dataset, keep):
        if generated_ids:
            ids = pa.array(range(next_row_id, next_row_id + batch.num_rows), type=pa.int64())
            batch = pa.RecordBatch.from_arrays([ids, *batch.columns], [id_column, *batch.schema.names])
        offset = 0
        while offset < batch.num_rows:
            if writer is None:
                schema = batch.schema
                path = chunk_dir / f"chunk-{len(chunks):05d}.parquet"
                writer = parquet_writer(path, schema)
            take = min(rows_per_chunk - written_in_chunk, batch.num_rows - offset)
            writer.write_batch(batch.slice(offset, take), row_group_size=take)
            written_in_chunk += take
            offset += take
            if generated_ids:
                next_row_id += take
            if written_in_chunk == rows_per_chunk:
                close_chunk()
    close_chunk()
    if schema is None:
        schema = dataset.schema
    manifest = Manifest(
        run_dir=str(run_dir),
        source=str(source),
        row_id_column=id_column,
        total_rows=sum(c.rows for c in chunks),
        chunk_rows=rows_per_chunk,
        schema={f.name: str(f.type) for f in schema},
        chunks=chunks,
    )
    write_json_atomically(run_dir / MANIFEST, manifest.to_dict())
    return manifest
