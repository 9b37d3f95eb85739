"""Parquet files of a run, laid out for their reader: staged chunks for the infer task, parts for any engine.

Also how a run file is opened for streaming (:func:`open_parquet`): one row group in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_infer import storage
from airflow_batch_infer.arrow_types import is_list


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


def open_parquet(path: str | Path, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    """Open a run file for streaming: without pre-buffering, reading holds one row group, not the file.

    On object storage the file is read in blocks through the location's connection. A local file is opened
    as a :class:`pyarrow.OSFile`, whose read buffers come from pyarrow's default memory pool at the time
    of opening (open it where the chunk streams, inside its pool). Given a path, pyarrow reads through its
    local filesystem, whose buffers come from Arrow's process-wide pool (mimalloc) whatever pyarrow's
    default is: the infer task then faulted in, and the kernel zeroed, fresh pages for every row group.

    :param path: the file.
    :param metadata: its footer, already read (it is not read again).
    """
    if storage.is_remote(path):
        return pq.ParquetFile(storage.open_input(path), metadata=metadata, pre_buffer=False)
    return pq.ParquetFile(pa.OSFile(str(path)), metadata=metadata, pre_buffer=False)
