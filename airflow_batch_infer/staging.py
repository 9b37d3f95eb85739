"""Staging: one snapshot of the input per run, as chunk files plus a manifest, and the run's folder layout.

A run's folder (a local folder, or a prefix on object storage such as ``s3://bucket/staging/...``) holds::

    manifest.json              written last: its presence means the snapshot is complete
    chunks/chunk-00000.parquet the input rows, with a row id, ``chunk_rows`` rows each
    outputs/part-00000.parquet one per chunk, written by the infer task
    rejects/part-00000.parquet rows set aside, with a reason
    summary.json               written by the persist task: what was committed where

Local run folders are named by :class:`~pathlib.Path`; folders on object storage by location strings that
carry the Airflow connection (see :mod:`airflow_batch_infer.storage`). Every file is written atomically:
into a local temporary file first, then renamed (local) or uploaded in one PUT (object storage).
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_infer import storage
from airflow_batch_infer.arrow_types import is_list

if TYPE_CHECKING:
    import pyarrow.dataset as ds

    from airflow_batch_infer.sources.base import Source

MANIFEST = "manifest.json"
SUMMARY = "summary.json"  # written by the persist task once the partition is committed
DEFAULT_ROW_ID_COLUMN = "row_id"
DEFAULT_MAX_CHUNKS = 1024  # Airflow's [core] max_map_length default
_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")

# A file of the run: a Path when local, a location string (``s3://conn@bucket/key``) on object storage.
RunPath = Path | str


class StagingError(ValueError):
    """The input cannot be staged; the message says what is wrong with it."""


@dataclass(frozen=True)
class ChunkDescriptor:
    """What a mapped infer task gets through XCom: where its chunk is, never the rows.

    :param run_dir: the run's staging folder (a local path or an object store location).
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
        path = run_file(run_dir, MANIFEST)
        if not storage.exists(path):
            raise StagingError(f"No manifest at {path}: the stage task has not completed for this run.")
        data = json.loads(storage.read_text(path))
        data["chunks"] = [ChunkDescriptor.from_dict(c) for c in data["chunks"]]
        return cls(**data)


def safe_name(text: str) -> str:
    """A folder name made of ``text`` (a run id, a partition key) with unsafe characters replaced."""
    cleaned = _SAFE.sub("_", text).strip("._")
    return cleaned or "_"


def run_file(run_dir: str | Path, *parts: str) -> RunPath:
    """A file of the run folder: a :class:`Path` when local, a location string on object storage."""
    if storage.is_remote(run_dir):
        return storage.join(run_dir, *parts)
    return Path(run_dir).joinpath(*parts)


def run_directory(staging_root: str | Path, dag_id: str, partition: str, run_id: str) -> RunPath:
    """The folder of one run: ``<staging_root>/<dag_id>/<partition>/<run_id>``.

    :param staging_root: a local folder, or an object store location (``s3://conn@bucket/prefix``).
    """
    return run_file(staging_root, safe_name(dag_id), safe_name(partition), safe_name(run_id))


def output_part_path(run_dir: str | Path, index: int) -> RunPath:
    """Where the infer task writes the outputs of chunk ``index``."""
    return run_file(run_dir, "outputs", f"part-{index:05d}.parquet")


def rejects_part_path(run_dir: str | Path, index: int) -> RunPath:
    """Where the infer task writes the rows of chunk ``index`` that it set aside."""
    return run_file(run_dir, "rejects", f"part-{index:05d}.parquet")


def check_inside(path: str | Path, root: str | Path) -> RunPath:
    """Return ``path`` normalised, refusing any path outside ``root`` (a chunk from another run, say)."""
    if storage.is_remote(path) or storage.is_remote(root):
        scheme, _, rest = str(path).partition("://")
        base_scheme, _, base_rest = str(root).partition("://")
        resolved, base = posixpath.normpath(rest), posixpath.normpath(base_rest)
        if scheme != base_scheme or not (resolved + "/").startswith(base.rstrip("/") + "/"):
            raise StagingError(f"Path {path} is outside the staging folder {root}; refusing to use it.")
        return f"{scheme}://{resolved}"
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        raise StagingError(f"Path {resolved} is outside the staging folder {base}; refusing to use it.")
    return resolved


def atomic_target(final: str | Path) -> Path:
    """A local temporary file to write ``final`` into; :func:`commit` then moves it in place.

    For a local ``final`` it is a sibling (so ``os.replace`` works as well as :func:`commit`); for an
    object store location it is a file in the system's temporary folder.
    """
    return storage.local_temp(final)


def commit(tmp: str | Path, final: str | Path) -> None:
    """Put the complete file ``tmp`` (from :func:`atomic_target`) at ``final`` in one atomic step."""
    storage.publish(tmp, final)


def parquet_writer(
    path: Path, schema: pa.Schema, *, chunk: bool = False, compress: bool = True
) -> pq.ParquetWriter:
    """A writer for the run's own files, tuned for write-once data.

    Floating-point columns (features, scores) are stored uncompressed: compression saves them about a
    tenth of their size and costs half again the CPU of reading them. Dictionary encoding is kept for text
    columns only: on numeric columns of mostly unique values it costs several times the CPU of the write
    for nothing.

    :param path: the file to write.
    :param schema: its schema.
    :param chunk: a staged chunk, read by this package's infer task only: integer columns (row ids) are
        delta-encoded, which makes them several times smaller than LZ4 does and reads three times faster;
        text is LZ4. Otherwise (output and rejects parts, which sinks such as ``s3_parquet``, ``athena``
        and ``redshift`` publish as they are) only encodings and codecs every Parquet reader knows: plain
        values, Snappy or none.
    :param compress: for a part, Snappy on its integer and text columns; without it, a part is stored
        uncompressed: the choice for parts on a local disk, read once by the persist task, where Snappy
        took two fifths of the part's write for a file two fifths smaller.
    """
    text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    leaves = list(_leaves(schema))
    codec = "lz4" if chunk else "snappy" if compress else "none"
    compression = {name: "none" if pa.types.is_floating(leaf) else codec for name, leaf in leaves}
    encoding = {name: "DELTA_BINARY_PACKED" for name, leaf in leaves if chunk and pa.types.is_integer(leaf)}
    compression.update(dict.fromkeys(encoding, "none"))
    return pq.ParquetWriter(
        path, schema, compression=compression, use_dictionary=text or False, column_encoding=encoding or None
    )


def required_where_no_nulls(batch: pa.RecordBatch) -> pa.Schema:
    """``batch``'s schema with its flat columns that hold no null marked non-nullable.

    A chunk file stores such columns as Parquet REQUIRED: with no definition levels to decode, the infer
    task reads them in about half the CPU.
    """
    return pa.schema(
        [
            f.with_nullable(False) if column.null_count == 0 and not pa.types.is_nested(f.type) else f
            for f, column in zip(batch.schema, batch.columns, strict=True)
        ],
        metadata=batch.schema.metadata,
    )


def _leaves(fields: Iterable[pa.Field], prefix: str = "") -> Iterator[tuple[str, pa.DataType]]:
    """Parquet column paths and value types of a schema's leaves (``emb.list.element`` for a list)."""
    for leaf in fields:
        path, arrow_type = f"{prefix}{leaf.name}", leaf.type
        if pa.types.is_struct(arrow_type):
            yield from _leaves(arrow_type.fields, f"{path}.")
        elif is_list(arrow_type):
            yield from _leaves([pa.field("element", arrow_type.value_type)], f"{path}.list.")
        elif pa.types.is_map(arrow_type):
            yield from _leaves([arrow_type.key_field, arrow_type.item_field], f"{path}.key_value.")
        else:
            yield path, arrow_type


def open_parquet(path: str | Path) -> pq.ParquetFile:
    """Open a run file for streaming: without pre-buffering, reading holds one row group, not the file.

    On object storage the file is read in blocks through the location's connection. A local file is opened
    as a :class:`pyarrow.OSFile`, whose read buffers come from pyarrow's current default memory pool (the
    pool a chunk streams with). Given a path, pyarrow reads through its local filesystem, whose buffers
    come from Arrow's process-wide pool (mimalloc) whatever pyarrow's default is: the infer task then
    faulted in, and the kernel zeroed, fresh pages for every row group.
    """
    if storage.is_remote(path):
        return pq.ParquetFile(storage.open_input(path), pre_buffer=False)
    return pq.ParquetFile(pa.OSFile(str(path)), pre_buffer=False)


def write_json_atomically(path: str | Path, data: dict[str, Any]) -> None:
    storage.write_bytes(path, json.dumps(data, indent=2).encode())


def open_source(source: str | Path | Sequence[str | Path], columns: Sequence[str] | None) -> ds.Dataset:
    """Open Parquet files or folders (hive partition folders understood) as one dataset."""
    from airflow_batch_infer.sources.parquet import ParquetSource

    parquet = ParquetSource(source)
    parquet.check_columns(columns)
    return parquet.dataset


def plan_chunk_rows(total_rows: int, chunk_rows: int, max_chunks: int) -> int:
    """Rows per chunk: ``chunk_rows``, raised as needed so the chunk count stays within ``max_chunks``."""
    if chunk_rows <= 0:
        raise StagingError(f"chunk_rows must be positive, got {chunk_rows}.")
    return max(chunk_rows, math.ceil(total_rows / max_chunks)) if total_rows else chunk_rows


def _check_columns(
    names: Sequence[str], columns: Sequence[str] | None, row_id_column: str | None, source: str
) -> None:
    if columns:
        missing = [c for c in columns if c not in names]
        if missing:
            raise StagingError(
                f"Column(s) {missing} are not in the input {source}; columns present: {list(names)}."
            )
    if row_id_column and row_id_column not in names:
        raise StagingError(
            f"Row id column {row_id_column!r} is not in the input; columns present: {list(names)}."
        )
    keep = list(columns) if columns else list(names)
    if row_id_column is None and DEFAULT_ROW_ID_COLUMN in keep:
        raise StagingError(
            f"The input already has a column {DEFAULT_ROW_ID_COLUMN!r}: pass "
            f"row_id_column={DEFAULT_ROW_ID_COLUMN!r} to use it as the row id, or leave it out of the "
            "columns staged."
        )


class _ChunkWriter:
    """Cuts a stream of record batches into chunk files of ``rows_per_chunk`` rows.

    :param run_dir: the run folder.
    :param folder: the chunk folder's name inside it.
    :param rows_per_chunk: rows per chunk file.
    :param id_column: the row id column; generated when ``generate_ids``.
    :param sequential_ids: whether the ids run 0, 1, 2... in stream order (then ``first_row`` is set).
    """

    def __init__(
        self,
        run_dir: str | Path,
        folder: str,
        rows_per_chunk: int,
        id_column: str,
        generate_ids: bool,
        sequential_ids: bool,
    ) -> None:
        self.run_dir = str(run_dir)
        self.folder = folder
        self.rows_per_chunk = rows_per_chunk
        self.id_column = id_column
        self.generate_ids = generate_ids
        self.sequential_ids = sequential_ids
        self.chunks: list[ChunkDescriptor] = []
        self.schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._in_chunk = 0
        self._rows_seen = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if self.generate_ids:
            ids = pa.array(range(self._rows_seen, self._rows_seen + batch.num_rows), type=pa.int64())
            batch = pa.RecordBatch.from_arrays([ids, *batch.columns], [self.id_column, *batch.schema.names])
        offset = 0
        while offset < batch.num_rows:
            take = min(self.rows_per_chunk - self._in_chunk, batch.num_rows - offset)
            piece = batch.slice(offset, take)
            if self._writer is None:
                self.schema = batch.schema
                self._tmp = atomic_target(self._final(len(self.chunks)))
                self._writer = parquet_writer(self._tmp, required_where_no_nulls(piece), chunk=True)
            else:
                self._allow_nulls(piece)
            piece = pa.RecordBatch.from_arrays(piece.columns, schema=self._writer.schema)
            self._writer.write_batch(piece, row_group_size=take)
            self._in_chunk += take
            self._rows_seen += take
            offset += take
            if self._in_chunk == self.rows_per_chunk:
                self.close_chunk()

    def _allow_nulls(self, piece: pa.RecordBatch) -> None:
        """Rewrite the chunk being written with nullable columns where ``piece`` brings the first nulls.

        Rare (a chunk's first batch had none in that column), and it copies one row group at a time.
        """
        schema = self._writer.schema
        columns = zip(schema, piece.columns, strict=True)
        newly_null = {f.name for f, column in columns if not f.nullable and column.null_count}
        if not newly_null:
            return
        widened = pa.schema([f.with_nullable(True) if f.name in newly_null else f for f in schema])
        self._writer.close()
        written, self._tmp = self._tmp, atomic_target(self._final(len(self.chunks)))
        self._writer = parquet_writer(self._tmp, widened, chunk=True)
        try:
            done = pq.ParquetFile(written)
            for group in range(done.num_row_groups):
                rows = done.read_row_group(group)
                self._writer.write_table(pa.Table.from_arrays(rows.columns, schema=widened), rows.num_rows)
        finally:
            storage.discard(written)

    def _final(self, index: int) -> RunPath:
        return run_file(self.run_dir, self.folder, f"chunk-{index:05d}.parquet")

    def close_chunk(self) -> None:
        if self._writer is None or self._tmp is None:
            return
        self._writer.close()
        index = len(self.chunks)
        final = self._final(index)
        size = self._tmp.stat().st_size
        commit(self._tmp, final)
        first = self._rows_seen - self._in_chunk if self.sequential_ids else -1
        self.chunks.append(ChunkDescriptor(self.run_dir, index, str(final), self._in_chunk, size, first))
        self._writer, self._tmp, self._in_chunk = None, None, 0

    def abort(self) -> None:
        """Drop the chunk being written (its temporary file); committed chunks stay for the caller."""
        if self._writer is not None:
            self._writer.close()
        if self._tmp is not None:
            storage.discard(self._tmp)
        self._writer, self._tmp = None, None


def _write_chunks(batches: Iterable[pa.RecordBatch], writer: _ChunkWriter) -> _ChunkWriter:
    try:
        for batch in batches:
            writer.write(batch)
        writer.close_chunk()
    except BaseException:
        writer.abort()
        raise
    return writer


def _staged_batches(chunks: Sequence[ChunkDescriptor]) -> Iterator[pa.RecordBatch]:
    for chunk in chunks:
        yield from open_parquet(chunk.path).iter_batches(batch_size=65_536)


def check_unique_ids(paths: Sequence[str], column: str) -> None:
    """Refuse a row id column that has nulls or duplicates: outputs join back to inputs by it.

    DuckDB counts over the staged chunk files, spilling to disk, so memory stays bounded however many
    rows there are.

    :param paths: the staged chunk files.
    :param column: the row id column.
    """
    quoted = '"' + column.replace('"', '""') + '"'
    with duckdb.connect() as con:
        con.execute(f"SET temp_directory = '{tempfile.gettempdir()}/abi-duckdb'")
        con.execute("SET memory_limit = '256MB'")
        files = {"files": storage.duckdb_readable(con, paths)}
        nulls = con.execute(
            f"SELECT count(*) FROM read_parquet($files) WHERE {quoted} IS NULL", files
        ).fetchone()
        if nulls[0]:
            raise StagingError(f"Row id column {column!r} has {nulls[0]:,} null(s): every row needs an id.")
        repeated = con.execute(
            f"SELECT {quoted}, count(*) AS n FROM read_parquet($files) GROUP BY 1 HAVING n > 1 "
            "ORDER BY n DESC, 1 LIMIT 5",
            files,
        ).fetchall()
    if repeated:
        shown = ", ".join(f"{value!r} ({count} times)" for value, count in repeated)
        raise StagingError(
            f"Row id column {column!r} is not unique: {shown}. Outputs join back to inputs by the row id: "
            "deduplicate the input, or leave row_id_column unset to number the rows."
        )


def stage_source(
    source: Source,
    run_dir: str | Path,
    *,
    chunk_rows: int = 250_000,
    columns: Sequence[str] | None = None,
    row_id_column: str | None = None,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
) -> Manifest:
    """Snapshot ``source`` into chunk files and write the manifest last.

    Rows stream through in record batches, so memory does not grow with the input. Staging the same
    run again replaces the earlier snapshot. When the source cannot count its rows beforehand (a SQL
    query), chunks of ``chunk_rows`` are written as the rows come; in the rare case that this makes more
    than ``max_chunks`` chunks, the staged rows are cut again into fewer, larger chunks (the snapshot
    itself is not read twice).

    :param source: where the rows come from (:mod:`airflow_batch_infer.sources`).
    :param run_dir: the run's staging folder (see :func:`run_directory`), local or on object storage.
    :param chunk_rows: rows per chunk; raised if the input would need more than ``max_chunks`` chunks.
    :param columns: columns to keep (all when ``None``); the row id column is always kept.
    :param row_id_column: the input's own unique row id column; when ``None`` a ``row_id`` column of
        sequential int64 ids is added.
    :param max_chunks: upper bound on the chunk count (Airflow's ``max_map_length``).
    """
    description = source.description
    known = source.schema()
    if known is not None:
        _check_columns(known.names, columns, row_id_column, description)
    keep = list(columns) if columns else None
    if keep is not None and row_id_column and row_id_column not in keep:
        keep.insert(0, row_id_column)
    generated_ids = row_id_column is None
    id_column = row_id_column or DEFAULT_ROW_ID_COLUMN
    total = source.count_rows()
    rows_per_chunk = plan_chunk_rows(total or 0, chunk_rows, max_chunks)
    storage.remove(run_dir)

    with source.open(keep) as reader:
        _check_columns(reader.schema.names, columns, row_id_column, description)
        batches: Iterable[pa.RecordBatch] = reader
        staged_schema = reader.schema
        if keep is not None and reader.schema.names != keep:
            staged_schema = pa.schema([reader.schema.field(c) for c in keep])
            batches = (b.select(keep) for b in reader)
        writer = _write_chunks(
            batches, _ChunkWriter(run_dir, "chunks", rows_per_chunk, id_column, generated_ids, generated_ids)
        )
    schema = writer.schema
    chunks = writer.chunks
    if not generated_ids and chunks:
        check_unique_ids([c.path for c in chunks], id_column)
    if len(chunks) > max_chunks:
        staged_rows = sum(c.rows for c in chunks)
        rows_per_chunk = plan_chunk_rows(staged_rows, chunk_rows, max_chunks)
        regrouped = _ChunkWriter(run_dir, "chunks-regrouped", rows_per_chunk, id_column, False, generated_ids)
        chunks = _write_chunks(_staged_batches(chunks), regrouped).chunks
        storage.remove(run_file(run_dir, "chunks"))
    if schema is None:  # no rows: the schema the chunks would have had
        schema = staged_schema
        if generated_ids:
            schema = schema.insert(0, pa.field(id_column, pa.int64()))
    manifest = Manifest(
        run_dir=str(run_dir),
        source=description,
        row_id_column=id_column,
        total_rows=sum(c.rows for c in chunks),
        chunk_rows=rows_per_chunk,
        schema={f.name: str(f.type) for f in schema},
        chunks=chunks,
    )
    write_json_atomically(run_file(run_dir, MANIFEST), manifest.to_dict())
    return manifest


def stage_parquet(
    source: str | Path | Sequence[str | Path],
    run_dir: str | Path,
    *,
    chunk_rows: int = 250_000,
    columns: Sequence[str] | None = None,
    row_id_column: str | None = None,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
    conn_id: str | None = None,
) -> Manifest:
    """Snapshot Parquet input into chunk files and write the manifest last (see :func:`stage_source`).

    :param source: a Parquet file, a folder of them (hive partitions understood), or a list of paths;
        local or on object storage (``s3://bucket/key``).
    :param run_dir: the run's staging folder (see :func:`run_directory`).
    :param chunk_rows: rows per chunk; raised if the input would need more than ``max_chunks`` chunks.
    :param columns: columns to keep (all when ``None``): only these are read from the files.
    :param row_id_column: the input's own unique row id column; when ``None`` a ``row_id`` column of
        sequential int64 ids is added.
    :param max_chunks: upper bound on the chunk count (Airflow's ``max_map_length``).
    :param conn_id: Airflow connection (``aws``) for a source on object storage.
    """
    from airflow_batch_infer.sources.parquet import ParquetSource

    return stage_source(
        ParquetSource(source, conn_id=conn_id),
        run_dir,
        chunk_rows=chunk_rows,
        columns=columns,
        row_id_column=row_id_column,
        max_chunks=max_chunks,
    )
