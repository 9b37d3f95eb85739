"""A snapshot by copy: the input's rows written into chunk files of the run folder, with a row id.

For SQL queries, whose rows exist nowhere else, and for files that the ETL rewrites in place
(``snapshot="copy"``). Rows stream through in record batches, so memory does not grow with the input.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_infer import storage
from airflow_batch_infer.errors import StagingError
from airflow_batch_infer.parquet_files import open_parquet, parquet_writer, required_where_no_nulls
from airflow_batch_infer.row_filter import RowFilter
from airflow_batch_infer.sources.base import Source
from airflow_batch_infer.staging import (
    ChunkDescriptor,
    Manifest,
    RunPath,
    atomic_target,
    check_columns,
    commit,
    run_file,
)
from airflow_batch_infer.staging_request import StagingRequest


def copy_rows(source: Source, request: StagingRequest) -> Manifest:
    """Copy ``source``'s rows into chunk files; the caller writes the returned manifest.

    A PostgreSQL query that allows it is exported in parallel ranges of one snapshot instead
    (:mod:`~airflow_batch_infer.sources.sql_ranges`). When the source cannot count its rows beforehand
    (a SQL query read as one stream), chunks of ``chunk_rows`` are written as
    the rows come; in the rare case that this makes more than ``max_chunks`` chunks, the staged rows are
    cut again into fewer, larger chunks (the source itself is not read twice).

    :param source: where the rows come from.
    :param request: the run's folder, columns, row ids, filter and chunk sizing; with a ``row_filter``,
        only the rows it keeps are copied (the others are counted).
    """
    if request.row_filter is not None:
        return _copy_filtered(source, request, request.row_filter)
    # A PostgreSQL query that allows it is exported in parallel ranges (imported here: it imports this).
    from airflow_batch_infer.sources.sql_ranges import copy_ranges

    ranged = copy_ranges(source, request)
    if ranged is not None:
        return ranged
    run_dir, keep = request.run_dir, request.keep
    generated_ids, id_column = request.generated_ids, request.id_column
    rows_per_chunk = request.rows_per_chunk(source.count_rows() or 0)
    with source.open(keep) as reader:
        check_columns(reader.schema.names, request.columns, request.row_id_column, source.description)
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
    request.check_unique_ids([c.path for c in chunks])
    if len(chunks) > request.max_chunks:
        rows_per_chunk = request.rows_per_chunk(sum(c.rows for c in chunks))
        regrouped = _ChunkWriter(run_dir, "chunks-regrouped", rows_per_chunk, id_column, False, generated_ids)
        chunks = _write_chunks(_staged_batches(chunks), regrouped).chunks
        storage.remove(run_file(run_dir, "chunks"))
    if schema is None:  # no rows: the schema the chunks would have had
        schema = staged_schema
        if generated_ids:
            schema = schema.insert(0, pa.field(id_column, pa.int64()))
    return request.manifest(source.description, chunks, schema, rows_per_chunk, sum(c.rows for c in chunks))


def _copy_filtered(source: Source, request: StagingRequest, row_filter: RowFilter) -> Manifest:
    """Copy the rows ``row_filter`` keeps; generated ids are numbered before filtering (the source rows'
    ids), so they are the ids a run without the filter would give."""
    generated_ids, id_column = request.generated_ids, request.id_column
    rows_per_chunk = request.rows_per_chunk(source.count_rows() or 0)
    names = request.keep if request.keep is not None else source.schema().names
    read = [*names, *(c for c in row_filter.columns if c not in names)]
    counts = {"seen": 0, "kept": 0}

    def kept_batches(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
        for batch in reader:
            mask = row_filter.mask(batch)
            selected = batch.select(names)
            if generated_ids:
                start = counts["seen"]
                ids = pa.array(range(start, start + batch.num_rows), type=pa.int64())
                selected = pa.RecordBatch.from_arrays([ids, *selected.columns], [id_column, *names])
            counts["seen"] += batch.num_rows
            selected = selected.filter(mask)
            counts["kept"] += selected.num_rows
            if selected.num_rows:
                yield selected

    with source.open(read) as reader:
        staged_schema = pa.schema([reader.schema.field(c) for c in names])
        if generated_ids:
            staged_schema = staged_schema.insert(0, pa.field(id_column, pa.int64()))
        writer = _ChunkWriter(request.run_dir, "chunks", rows_per_chunk, id_column, False, False)
        chunks = _write_chunks(kept_batches(reader), writer).chunks
    # Cannot happen: fewer rows than counted, so no more chunks than planned.
    if len(chunks) > request.max_chunks:
        raise StagingError(
            f"Filtered staging made {len(chunks)} chunks, more than max_chunks={request.max_chunks}."
        )
    request.check_unique_ids([c.path for c in chunks])
    schema = writer.schema or staged_schema
    return request.manifest(
        source.description,
        chunks,
        schema,
        rows_per_chunk,
        counts["kept"],
        filtered_rows=counts["seen"] - counts["kept"],
    )


class _ChunkWriter:
    """Cuts a stream of record batches into chunk files of ``rows_per_chunk`` rows.

    :param run_dir: the run folder.
    :param folder: the chunk folder's name inside it.
    :param rows_per_chunk: rows per chunk file.
    :param id_column: the row id column; generated when ``generate_ids``.
    :param sequential_ids: whether the ids run 0, 1, 2... in stream order (then ``first_row`` is set).
    :param first_index: the number of its first chunk (a range of a ranged export starts further on).
    :param first_id: the generated id of its first row.
    """

    def __init__(
        self,
        run_dir: str | Path,
        folder: str,
        rows_per_chunk: int,
        id_column: str,
        generate_ids: bool,
        sequential_ids: bool,
        first_index: int = 0,
        first_id: int = 0,
    ) -> None:
        self.run_dir = str(run_dir)
        self.folder = folder
        self.rows_per_chunk = rows_per_chunk
        self.id_column = id_column
        self.generate_ids = generate_ids
        self.sequential_ids = sequential_ids
        self.first_index = first_index
        self.first_id = first_id
        self.chunks: list[ChunkDescriptor] = []
        self.schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._in_chunk = 0
        self._rows_seen = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if self.generate_ids:
            start = self.first_id + self._rows_seen
            ids = pa.array(range(start, start + batch.num_rows), type=pa.int64())
            batch = pa.RecordBatch.from_arrays([ids, *batch.columns], [self.id_column, *batch.schema.names])
        offset = 0
        while offset < batch.num_rows:
            take = min(self.rows_per_chunk - self._in_chunk, batch.num_rows - offset)
            piece = batch.slice(offset, take)
            if self._writer is None:
                self.schema = batch.schema
                self._tmp = atomic_target(self._final(self.first_index + len(self.chunks)))
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
        written, self._tmp = self._tmp, atomic_target(self._final(self.first_index + len(self.chunks)))
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
        index = self.first_index + len(self.chunks)
        final = self._final(index)
        size = self._tmp.stat().st_size
        commit(self._tmp, final)
        first = self.first_id + self._rows_seen - self._in_chunk if self.sequential_ids else -1
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
