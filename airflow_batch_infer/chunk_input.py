"""What an infer task reads: its chunk, as record batches of the columns it asks for.

A chunk is either a staged chunk file (a copied snapshot) or row-group ranges of the input files that the
manifest pinned (a snapshot by reference). Both read one row group's columns at a time, projected to the
columns asked for, so memory does not grow with the chunk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_infer import storage
from airflow_batch_infer.arrow_types import constant_array, numeric_array
from airflow_batch_infer.errors import SourceChangedError, StagingError
from airflow_batch_infer.parquet_files import open_parquet
from airflow_batch_infer.row_filter import RowFilter
from airflow_batch_infer.staging import ChunkDescriptor, Manifest, check_inside


class ChunkInput(ABC):
    """One chunk to read.

    :ivar description: where the rows are, for the log.
    :ivar num_rows: rows in the chunk.
    :ivar schema: its columns; a field is non-nullable where the chunk provably holds no null in it.
    :ivar filtered_rows: rows of ``num_rows`` that the run's ``filter=`` removed as they were read
        (neither scored nor set aside); known once the chunk has been read.
    """

    description: str
    num_rows: int
    schema: pa.Schema
    filtered_rows: int = 0

    @abstractmethod
    def bytes_per_row(self, columns: Sequence[str]) -> float:
        """About how many decoded bytes a row of ``columns`` takes (0 when unknown)."""

    @abstractmethod
    def iter_batches(self, batch_size: int, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        """The chunk's rows in order, ``batch_size`` rows at most a batch, with ``columns`` in that order."""


class StagedChunk(ChunkInput):
    """A chunk file of a copied snapshot (or any single Parquet file).

    :param path: the file, local or on object storage.
    """

    def __init__(self, path: str | Path) -> None:
        self.description = str(path)
        self._path = path
        self._parquet = open_parquet(path)
        self.num_rows = self._parquet.metadata.num_rows
        self.schema = self._parquet.schema_arrow

    def bytes_per_row(self, columns: Sequence[str]) -> float:
        return _group_bytes_per_row(self._parquet.metadata, 0, columns)

    def iter_batches(self, batch_size: int, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        # Opened again here, where the chunk streams, so that its read buffers come from that memory pool.
        # use_threads=False: a few columns decode faster in this thread than handed to a pool.
        parquet = open_parquet(self._path, self._parquet.metadata)
        return parquet.iter_batches(batch_size=batch_size, columns=list(columns), use_threads=False)


class PinnedChunk(ChunkInput):
    """Row-group ranges of pinned input files: the chunk of a snapshot by reference.

    Every file is checked against its pin (size and version, then its row groups) before a row is read:
    a file changed since the stage task fails the chunk with :class:`SourceChangedError`. Generated row
    ids are the file's first id plus the row's offset in the file; hive partition columns are filled from
    the values pinned for the file. The run's ``filter=`` is applied as the rows are read, after their
    ids are numbered; the rows it removes are counted in :attr:`filtered_rows`.

    :param manifest: the run's manifest (the only source of file paths: a descriptor names files by index).
    :param descriptor: the chunk.
    """

    def __init__(self, manifest: Manifest, descriptor: ChunkDescriptor) -> None:
        self.description = f"{len(descriptor.slices)} row-group range(s) of {manifest.source}"
        self.num_rows = descriptor.rows
        self._id_column = manifest.row_id_column if manifest.generated_ids else None
        self._slices = descriptor.slices
        self._files: dict[int, tuple[dict[str, Any], pq.ParquetFile]] = {}
        for piece in self._slices:
            number = int(piece["file"])
            if number not in self._files:
                if not 0 <= number < len(manifest.files):
                    raise StagingError(f"Chunk {descriptor.index} names file {number}, not in the manifest.")
                pinned = manifest.files[number]
                self._files[number] = (pinned, _open_pinned(pinned))
        self._types = {name: _arrow_type(text) for name, text in manifest.schema.items()}
        self.schema = self._chunk_schema(manifest)
        self._filter = RowFilter.from_dict(manifest.row_filter)
        self.filtered_rows = 0

    def _chunk_schema(self, manifest: Manifest) -> pa.Schema:
        fields = []
        for name in manifest.schema:
            if name == self._id_column:
                fields.append(pa.field(name, pa.int64(), nullable=False))
                continue
            nullable = False
            field = None
            for pinned, parquet in self._files.values():
                if name in pinned["partition"]:
                    value = pinned["partition"][name]
                    field = field or pa.field(name, self._types[name] or pa.scalar(value).type)
                    nullable = nullable or value is None  # a __HIVE_DEFAULT_PARTITION__ folder
                    continue
                file_field = parquet.schema_arrow.field(name)
                field = field or file_field
                nullable = nullable or not self._no_nulls(parquet, name)
            fields.append(field.with_nullable(nullable))
        return pa.schema(fields)

    def _no_nulls(self, parquet: pq.ParquetFile, name: str) -> bool:
        """Whether the statistics of every row group this chunk reads of ``parquet`` count no null."""
        metadata = parquet.metadata
        leaf = [i for i in range(metadata.num_columns) if metadata.schema.column(i).path == name]
        if len(leaf) != 1:
            return False  # nested: not worth proving
        for piece in self._slices:
            if self._files[int(piece["file"])][1] is not parquet:
                continue
            for group in range(*piece["row_groups"]):
                stats = metadata.row_group(group).column(leaf[0]).statistics
                if stats is None or not stats.has_null_count or stats.null_count:
                    return False
        return True

    def bytes_per_row(self, columns: Sequence[str]) -> float:
        first = self._slices[0]
        return _group_bytes_per_row(
            self._files[int(first["file"])][1].metadata, first["row_groups"][0], columns
        )

    def iter_batches(self, batch_size: int, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        schema = pa.schema([self.schema.field(c) for c in columns])
        extra = [c for c in self._filter.columns if c not in columns] if self._filter else []
        for piece in self._slices:
            pinned, parquet = self._files[int(piece["file"])]
            partition = pinned["partition"]
            stored = [c for c in [*columns, *extra] if c != self._id_column and c not in partition]
            next_id = int(piece["first_row"])
            # Opened again here, where the chunk streams, so that its read buffers come from that pool.
            parquet = open_parquet(pinned["path"], parquet.metadata)
            batches = parquet.iter_batches(
                batch_size=batch_size,
                row_groups=range(*piece["row_groups"]),
                columns=stored,
                use_threads=False,
            )
            for batch in batches:
                rows = batch.num_rows
                arrays = []
                for name in columns:
                    if name == self._id_column:
                        arrays.append(numeric_array(np.arange(next_id, next_id + rows, dtype=np.int64)))
                    elif name in partition:
                        arrays.append(constant_array(partition[name], schema.field(name).type, rows))
                    else:
                        arrays.append(batch.column(name))
                next_id += rows
                read = pa.RecordBatch.from_arrays(arrays, schema=schema)
                if self._filter is not None:
                    read = self._filtered(read, batch, partition, extra)
                yield read

    def _filtered(
        self, read: pa.RecordBatch, batch: pa.RecordBatch, partition: dict[str, Any], extra: list[str]
    ) -> pa.RecordBatch:
        """The rows of ``read`` that the filter keeps; ``extra`` filter columns come from ``batch`` or the
        file's partition values."""
        for name in extra:
            column = pa.repeat(pa.scalar(partition[name]), read.num_rows) if name in partition else None
            read = read.append_column(name, column if column is not None else batch.column(name))
        kept = read.filter(self._filter.mask(read))
        self.filtered_rows += read.num_rows - kept.num_rows
        return kept.select(read.schema.names[: read.num_columns - len(extra)])


def open_chunk(descriptor: ChunkDescriptor, manifest: Manifest) -> ChunkInput:
    """The chunk a descriptor names, checked against the run's manifest.

    :param descriptor: from the stage task, through XCom.
    :param manifest: the run's manifest, read from the run folder.
    """
    if descriptor.slices:
        return PinnedChunk(manifest, descriptor)
    return StagedChunk(check_inside(descriptor.path, descriptor.run_dir))


def _open_pinned(pinned: dict[str, Any]) -> pq.ParquetFile:
    """Open a pinned file after checking that it is still the version the stage task pinned."""
    path = pinned["path"]
    try:
        now = storage.pin(path)
    except FileNotFoundError:
        now = None
    if now is None or now["size"] != pinned["size"] or now["version"] != pinned["version"]:
        found = "it is gone" if now is None else f"size {now['size']}, version {now['version']}"
        raise SourceChangedError(
            f"Input file {path} changed after the stage task pinned it (pinned: size {pinned['size']}, "
            f"version {pinned['version']}; now: {found}). The run's snapshot no longer holds, so this "
            "chunk is not scored: run the DAG run again from its stage task to take a new snapshot, or "
            "stage with snapshot='copy' if the ETL rewrites its files in place."
        )
    parquet = open_parquet(path)
    metadata = parquet.metadata
    groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    if groups != list(pinned["row_groups"]):
        raise SourceChangedError(
            f"Input file {path} no longer has the row groups the stage task pinned: run the DAG run again "
            "from its stage task to take a new snapshot."
        )
    return parquet


def _group_bytes_per_row(metadata: pq.FileMetaData, group: int, columns: Sequence[str]) -> float:
    if not metadata.num_row_groups or not metadata.row_group(group).num_rows:
        return 0.0
    row_group = metadata.row_group(group)
    wanted = set(columns)
    size = sum(
        row_group.column(i).total_uncompressed_size
        for i in range(row_group.num_columns)
        if row_group.column(i).path_in_schema.split(".")[0] in wanted
    )
    return size / row_group.num_rows


def _arrow_type(text: str) -> pa.DataType | None:
    """The Arrow type a manifest names (``int32``, ``string``...), where pyarrow knows the alias."""
    try:
        return pa.type_for_alias(text)
    except ValueError:
        return None
