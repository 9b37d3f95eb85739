"""``limit_rows=N``: a smoke run of the whole pipeline on the first rows of the input, in a scratch partition.

The run stages only the first rows and writes them to the partition ``<partition>__limit_<N>``
(:func:`scratch_partition`), so the run's real partition is never touched. A snapshot by copy (and every
SQL query) copies exactly the first ``N`` rows (:class:`LimitedSource`); a snapshot by reference pins the
first row groups that hold ``N`` rows (:func:`limit_pinned`): whole row groups, so the last one may carry
the run past ``N`` by less than a row group.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

from airflow_batch_infer.chunk_sizing import plan_chunk_rows
from airflow_batch_infer.errors import StagingError
from airflow_batch_infer.partition import validate_partition
from airflow_batch_infer.pinned_staging import row_group_chunks
from airflow_batch_infer.sources.base import Source
from airflow_batch_infer.staging import MANIFEST, Manifest, run_file, write_json_atomically

SCRATCH_MARK = "__limit_"


def row_limit(limit_rows: int | str | None) -> int | None:
    """``limit_rows`` as a positive number of rows, or ``None`` for no limit (a template rendered empty).

    :param limit_rows: the operator's ``limit_rows``.
    """
    if limit_rows in (None, "", "None", 0, "0"):
        return None
    try:
        limit = int(limit_rows)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise StagingError(f"limit_rows must be a number of rows, got {limit_rows!r}.") from None
    if limit < 0:
        raise StagingError(f"limit_rows must be positive, got {limit}.")
    return limit


def scratch_partition(partition: str, limit: int) -> str:
    """The partition a run limited to ``limit`` rows writes instead of ``partition``.

    :param partition: the run's partition.
    :param limit: the row limit.
    """
    return validate_partition(f"{partition}{SCRATCH_MARK}{limit}")


class LimitedSource(Source):
    """The first ``limit`` rows of another source, read as a stream that stops there.

    :param source: the source whose first rows are read.
    :param limit: how many rows.
    """

    def __init__(self, source: Source, limit: int) -> None:
        self.source = source
        self.limit = limit

    @property
    def description(self) -> str:
        return f"the first {self.limit:,} rows of {self.source.description}"

    def schema(self) -> pa.Schema | None:
        return self.source.schema()

    def count_rows(self) -> int | None:
        total = self.source.count_rows()
        return None if total is None else min(total, self.limit)

    @contextmanager
    def open(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatchReader]:
        with self.source.open(columns) as reader:
            yield pa.RecordBatchReader.from_batches(reader.schema, _first_rows(reader, self.limit))


def _first_rows(batches: pa.RecordBatchReader, limit: int) -> Iterator[pa.RecordBatch]:
    left = limit
    for batch in batches:
        if left <= 0:
            return
        yield batch if batch.num_rows <= left else batch.slice(0, left)
        left -= batch.num_rows


def limit_pinned(
    manifest: Manifest, limit: int, chunk_rows: int | str, max_chunks: int, parallel_tasks: int
) -> Manifest:
    """Keep only the first row groups of a snapshot by reference that hold ``limit`` rows; rewrite its
    manifest. The files stay pinned whole (their footers must match at read time); the chunks cover less.

    :param manifest: a snapshot by reference, as staged.
    :param limit: the row limit.
    :param chunk_rows: rows per chunk, or ``"auto"`` (planned again for the rows kept).
    :param max_chunks: upper bound on the chunk count.
    :param parallel_tasks: infer tasks that can run at once, for ``chunk_rows="auto"``.
    """
    kept: list[dict[str, Any]] = []
    left = limit
    for pinned in manifest.files:
        if left <= 0:
            break
        groups: list[int] = []
        for rows in pinned["row_groups"]:
            if left <= 0:
                break
            groups.append(rows)
            left -= rows
        kept.append(
            {**pinned, "row_groups": groups, "row_group_bytes": pinned["row_group_bytes"][: len(groups)]}
        )
    total = sum(sum(f["row_groups"]) for f in kept)
    manifest.chunk_rows = plan_chunk_rows(total, chunk_rows, max_chunks, parallel_tasks)
    manifest.chunks = row_group_chunks(manifest.run_dir, kept, manifest.chunk_rows, manifest.generated_ids)
    manifest.total_rows = total
    write_json_atomically(run_file(manifest.run_dir, MANIFEST), manifest.to_dict())
    return manifest
