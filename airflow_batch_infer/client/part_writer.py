"""An output or rejects part being written: record batches gathered into large row groups, written in a
thread of their own, optionally through the user's ``postprocess`` (pandas, per row group)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_infer.parquet_files import parquet_writer

WRITE_ROWS = 262_144  # rows per output row group: large groups encode and read fast

Postprocess = Callable[[Any], Any]  # pandas.DataFrame → pandas.DataFrame


class PostprocessError(ValueError):
    """The user's ``postprocess`` failed or returned something that cannot be written: a retry cannot
    fix it."""


class PartBuffer:
    """Record batches waiting to be written to a part file, flushed in large row groups.

    :param path: the part's (temporary) file.
    :param schema: the part's schema as scored (before ``postprocess``).
    :param thread: where the row groups are transformed, encoded and written.
    :param compress: Snappy on integer and text columns.
    :param postprocess: pandas DataFrame → DataFrame applied to each row group before it is written; it
        must keep every row, in order, and the row id column.
    :param row_id_column: the row id column that ``postprocess`` must keep.
    :param chunk: the chunk number, for error messages.
    """

    def __init__(
        self,
        path: str | Path,
        schema: pa.Schema,
        thread: ThreadPoolExecutor,
        *,
        compress: bool,
        postprocess: Postprocess | None = None,
        row_id_column: str | None = None,
        chunk: int = 0,
    ) -> None:
        self.path = path
        self.schema = schema
        self.thread = thread
        self.compress = compress
        self.postprocess = postprocess
        self.row_id_column = row_id_column
        self.chunk = chunk
        self.rows = 0
        self.written_schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = (
            None if postprocess else parquet_writer(path, schema, compress=compress)
        )
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    async def add(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self.rows += batch.num_rows
        if self._pending_rows >= WRITE_ROWS:
            await self.flush()

    async def flush(self) -> None:
        if self._pending:
            table = pa.Table.from_batches(self._pending, schema=self.schema)
            self._pending, self._pending_rows = [], 0
            await asyncio.get_running_loop().run_in_executor(self.thread, self._write, table)

    def _write(self, table: pa.Table) -> None:
        if self.postprocess is not None:
            table = self._postprocessed(table)
        if self._writer is None:
            self.written_schema = table.schema
            self._writer = parquet_writer(self.path, table.schema, compress=self.compress)
        self._writer.write_table(table)

    def _postprocessed(self, table: pa.Table) -> pa.Table:
        where = f"postprocess on chunk {self.chunk}"
        if self.row_id_column and table.num_rows:
            ids = table[self.row_id_column]
            where += f" (rows with {self.row_id_column} {ids[0].as_py()}…{ids[-1].as_py()})"
        try:
            result = self.postprocess(table.to_pandas())
        except Exception as error:
            raise PostprocessError(f"{where} failed: {type(error).__name__}: {error}") from error
        if not hasattr(result, "columns") or not hasattr(result, "index"):
            raise PostprocessError(f"{where} returned {type(result).__name__}: return a pandas DataFrame.")
        if len(result) != table.num_rows:
            raise PostprocessError(
                f"{where} returned {len(result)} rows for {table.num_rows}: it must keep every row, so that "
                "every row stays accounted for (filter rows before scoring, or after persisting)."
            )
        if self.row_id_column and (
            self.row_id_column not in result.columns
            or result[self.row_id_column].tolist() != table[self.row_id_column].to_pylist()
        ):
            raise PostprocessError(f"{where} must keep column {self.row_id_column!r} as it is, row for row.")
        try:
            out = pa.Table.from_pandas(result, preserve_index=False)
            if self.written_schema is not None:
                out = out.select(self.written_schema.names).cast(self.written_schema)
        except (pa.ArrowException, KeyError, ValueError, TypeError) as error:
            raise PostprocessError(
                f"{where} returned columns that cannot be written ({error}); every row group must give "
                f"the same columns and types as the first: {self.written_schema}."
            ) from error
        return out

    def close(self) -> None:
        """Finish the file (a part with no rows keeps the scored schema)."""
        if self._writer is None:
            schema = self.schema
            if self.postprocess is not None:
                with contextlib.suppress(PostprocessError):  # not every function takes an empty frame
                    schema = self._postprocessed(self.schema.empty_table()).schema
            self._writer = parquet_writer(self.path, schema, compress=self.compress)
        self._writer.close()

    def abort(self) -> None:
        """Close the file if open, after a failure (the caller discards it)."""
        if self._writer is not None and self._writer.is_open:
            self._writer.close()
