"""A snapshot by reference: Parquet input files pinned by the manifest, chunks as row-group ranges.

Stage reads each file's footer and nothing else, so its cost grows with the number of files and row
groups, not with the rows. Every file is pinned by its size and version (modification time, or the
object's version id or ETag); a chunk is a list of row-group ranges of those files, cut at row-group
boundaries into about ``chunk_rows`` rows. The infer task reads its row groups straight from the source
(:mod:`airflow_batch_infer.chunk_input`) and fails its chunk if a pinned file changed since.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from airflow_batch_infer import storage
from airflow_batch_infer.row_filter import RowFilter
from airflow_batch_infer.sources.parquet import ParquetSource, SourceFile
from airflow_batch_infer.staging import ChunkDescriptor, Manifest
from airflow_batch_infer.staging_request import StagingRequest


def pin_files(source: ParquetSource, request: StagingRequest) -> Manifest:
    """Pin ``source``'s files and cut their row groups into chunks; the caller writes the manifest.

    Generated row ids are not written anywhere: the infer tasks add them as they read. Row groups whose
    statistics show that ``request.row_filter`` keeps none of their rows are pruned here (counted as
    filtered); the rest are filtered as the infer tasks read them.

    :param source: the Parquet input.
    :param request: the run's folder, columns, row ids, filter and chunk sizing.
    """
    files = pinned_files(source, request.row_filter)
    pruned = sum(f["rows"] - _kept_rows(f) for f in files)
    total = sum(f["rows"] for f in files) - pruned
    rows_per_chunk = request.rows_per_chunk(total)
    request.check_unique_ids([f["path"] for f in files])
    schema = source.schema()
    if request.keep is not None:
        schema = pa.schema([schema.field(c) for c in request.keep])
    if request.generated_ids:
        schema = schema.insert(0, pa.field(request.id_column, pa.int64(), nullable=False))
    chunks = row_group_chunks(str(request.run_dir), files, rows_per_chunk, request.generated_ids)
    return request.manifest(
        source.description,
        chunks,
        schema,
        rows_per_chunk,
        total,
        snapshot="reference",
        files=files,
        filtered_rows=pruned,
    )


def pinned_files(source: ParquetSource, row_filter: RowFilter | None = None) -> list[dict[str, Any]]:
    """Each file of ``source`` that holds rows, pinned: read from its footer, never its rows.

    With ``row_filter``, ``pruned`` lists the row groups whose statistics (or hive partition values) show
    that the filter keeps none of their rows. A file found by listing is pinned before its footer is read,
    so a file rewritten in between fails its chunk later rather than being read with a stale footer;
    hive-partitioned files, whose footers the dataset's discovery reads, are pinned just after.
    """
    files = []
    first_row = 0
    for found in source.files():
        pinned = found.pin or storage.pin(found.location)
        metadata = found.metadata
        if not metadata.num_rows:
            continue
        groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
        files.append(
            {
                "path": found.location,
                **pinned,
                "rows": metadata.num_rows,
                "row_groups": [g.num_rows for g in groups],
                "row_group_bytes": [g.total_byte_size for g in groups],
                "first_row": first_row,
                "partition": found.partition,
                "pruned": _pruned_groups(found, row_filter, source) if row_filter else [],
            }
        )
        first_row += metadata.num_rows
    return files


def row_group_chunks(
    run_dir: str, files: list[dict[str, Any]], rows_per_chunk: int, generated_ids: bool
) -> list[ChunkDescriptor]:
    """Cut the files' row groups, in order, into chunks of at least ``rows_per_chunk`` rows (the last may
    hold fewer); a chunk's row groups of one file form one slice.

    :param run_dir: the run's staging folder.
    :param files: the pinned files.
    :param rows_per_chunk: rows a chunk reaches before it is closed.
    :param generated_ids: whether the chunks' first ids are known (generated ids).
    """
    chunks: list[ChunkDescriptor] = []
    slices: list[dict[str, Any]] = []
    rows = size = 0

    def close() -> None:
        nonlocal slices, rows, size
        if slices:
            first = slices[0]["first_row"] if generated_ids else -1
            chunks.append(ChunkDescriptor(run_dir, len(chunks), "", rows, size, first, slices))
        slices, rows, size = [], 0, 0

    for number, pinned in enumerate(files):
        row = pinned["first_row"]
        pruned = set(pinned.get("pruned") or ())
        for group, (group_rows, group_bytes) in enumerate(
            zip(pinned["row_groups"], pinned["row_group_bytes"], strict=True)
        ):
            if group in pruned:
                row += group_rows  # ids stay those of the source rows
                continue
            last = slices[-1] if slices else None
            if last is not None and last["file"] == number and last["row_groups"][1] == group:
                last["row_groups"][1] = group + 1
            else:
                slices.append({"file": number, "row_groups": [group, group + 1], "first_row": row})
            row += group_rows
            rows += group_rows
            size += group_bytes
            if rows >= rows_per_chunk:
                close()
    close()
    return chunks


def _kept_rows(pinned: dict[str, Any]) -> int:
    pruned = set(pinned.get("pruned") or ())
    return sum(rows for group, rows in enumerate(pinned["row_groups"]) if group not in pruned)


def _pruned_groups(found: SourceFile, row_filter: RowFilter, source: ParquetSource) -> list[int]:
    """The row groups of ``found`` that the filter provably keeps nothing of (by their statistics)."""
    fragment = source.fragment(found.location)
    try:
        kept = {g.id for g in fragment.subset(filter=row_filter.named, schema=source.schema()).row_groups}
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return []  # no usable statistics: every row group is read and filtered
    return [g for g in range(found.metadata.num_row_groups) if g not in kept]
