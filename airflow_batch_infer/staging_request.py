"""What :func:`~airflow_batch_infer.staging.stage_source` asks of the code that takes the snapshot, by
reference (:mod:`~airflow_batch_infer.pinned_staging`) or by copy (:mod:`~airflow_batch_infer.copy_staging`,
:mod:`~airflow_batch_infer.sources.sql_ranges`): where, which columns and rows, how the rows are identified
and how many go in a chunk; and the manifest that each of them returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from airflow_batch_infer.chunk_sizing import plan_chunk_rows
from airflow_batch_infer.row_filter import RowFilter
from airflow_batch_infer.staging import DEFAULT_ROW_ID_COLUMN, ChunkDescriptor, Manifest, check_unique_ids


@dataclass(frozen=True)
class StagingRequest:
    """One snapshot to take; the caller writes the manifest it gives.

    :param run_dir: the run's staging folder.
    :param chunk_rows: rows per chunk, or ``"auto"``.
    :param max_chunks: upper bound on the chunk count.
    :param parallel_tasks: infer tasks that can run at once, for ``chunk_rows="auto"``.
    :param columns: the columns asked for (``None``: all).
    :param keep: the columns staged: ``columns`` plus the row id column (``None``: all).
    :param row_id_column: the input's own row id column (``None``: a ``row_id`` is generated).
    :param row_filter: the rows to stage (a Parquet source's ``filter=``), if any.
    """

    run_dir: str | Path
    chunk_rows: int | str
    max_chunks: int
    parallel_tasks: int
    columns: Sequence[str] | None = None
    keep: list[str] | None = None
    row_id_column: str | None = None
    row_filter: RowFilter | None = None

    @property
    def generated_ids(self) -> bool:
        """Whether staging adds the row id column (ids 0, 1, 2... in the order of the input's rows)."""
        return self.row_id_column is None

    @property
    def id_column(self) -> str:
        """The row id column of the staged rows."""
        return self.row_id_column or DEFAULT_ROW_ID_COLUMN

    def rows_per_chunk(self, total_rows: int) -> int:
        """Rows per chunk for ``total_rows`` rows (0 when not known; see
        :func:`~airflow_batch_infer.chunk_sizing.plan_chunk_rows`)."""
        return plan_chunk_rows(total_rows, self.chunk_rows, self.max_chunks, self.parallel_tasks)

    def check_unique_ids(self, paths: Sequence[str]) -> None:
        """Refuse the input's own row ids where they repeat in ``paths`` (generated ids are unique)."""
        if not self.generated_ids and paths:
            check_unique_ids(list(paths), self.id_column)

    def manifest(
        self,
        source: str,
        chunks: list[ChunkDescriptor],
        schema: pa.Schema,
        chunk_rows: int,
        total_rows: int,
        **snapshot: Any,
    ) -> Manifest:
        """The manifest of the snapshot taken.

        :param source: the source's description.
        :param chunks: the chunks.
        :param schema: the staged rows' schema, the row id column included.
        :param chunk_rows: rows per chunk.
        :param total_rows: rows staged.
        :param snapshot: the snapshot's own fields of :class:`~airflow_batch_infer.staging.Manifest`
            (``snapshot``, ``files``, ``filtered_rows``).
        """
        return Manifest(
            run_dir=str(self.run_dir),
            source=source,
            row_id_column=self.id_column,
            total_rows=total_rows,
            chunk_rows=chunk_rows,
            schema={f.name: str(f.type) for f in schema},
            chunks=chunks,
            generated_ids=self.generated_ids,
            row_filter=self.row_filter.to_dict() if self.row_filter else None,
            **snapshot,
        )
