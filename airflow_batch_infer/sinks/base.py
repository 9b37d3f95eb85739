"""The contract of a warehouse sink, and SQL identifier checking shared by all of them."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_batch_infer.errors import BatchInferFailure

if TYPE_CHECKING:  # Arrow is imported where parts are read: the DAG's parse imports this module
    import pyarrow as pa

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
REJECTS_SUFFIX = "_rejects"


class SchemaMismatchError(BatchInferFailure, ValueError):
    """An existing table's columns do not fit the outputs; the message names the column."""


def validate_identifier(name: str, what: str = "identifier") -> str:
    """Refuse anything but a plain SQL identifier (letters, digits, underscore; 63 characters at most).

    :param name: the identifier, possibly from a DAG Param.
    :param what: what it names, for the error message (``table``, ``column``).
    """
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):  # "t\n" is not "t"
        raise ValueError(
            f"Invalid {what} name {name!r}: use letters, digits and underscores, starting with a letter "
            "or underscore, at most 63 characters."
        )
    return name


def quote_identifier(name: str, what: str = "identifier") -> str:
    """Validate ``name`` and return it double-quoted for SQL."""
    return '"' + validate_identifier(name, what) + '"'


def sql_literal(value: str, what: str = "value") -> str:
    """``value`` as a single-quoted SQL string literal, for the few statements that take no parameters
    (Redshift Data API batches, Athena DDL). Quotes are doubled; backslashes and control characters are
    refused, so the text can never end the literal.
    """
    if not isinstance(value, str) or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"Invalid {what} {value!r}: no backslashes or control characters allowed.")
    return "'" + value.replace("'", "''") + "'"


def qualified_table(table: str) -> str:
    """Quote ``table`` or ``schema.table``, each part validated."""
    parts = table.split(".")
    if len(parts) > 2:
        raise ValueError(f"Invalid table name {table!r}: use 'table' or 'schema.table'.")
    return ".".join(quote_identifier(p, "table") for p in parts)


@dataclass
class PersistResult:
    """What a sink wrote: small enough for XCom and the task log.

    :param table: the output table.
    :param rejects_table: the table of rows set aside.
    :param partition: the partition replaced.
    :param rows: rows now in the partition of ``table``.
    :param rejected: rows now in the partition of ``rejects_table``.
    :param replaced: rows the partition held before (0 on a first run; -1 when not known, e.g. a
        Redshift batch not waited for).
    :param location: where the table lives (a database file, a URL without credentials).
    """

    table: str
    rejects_table: str
    partition: str
    rows: int
    rejected: int
    replaced: int
    location: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_table(table: str) -> tuple[str | None, str]:
    """``(schema, name)`` of ``table`` or ``schema.table``, both validated."""
    qualified_table(table)
    schema, _, name = table.rpartition(".")
    return schema or None, name


def check_fit(
    table: str,
    partition_column: str,
    existing: Mapping[str, str],
    incoming: Mapping[str, str],
    fits: Callable[[str, str], bool] = lambda have, want: have == want,
) -> None:
    """Check that an existing table can take the outputs; the error names the column that does not fit.

    :param table: the table, for the messages.
    :param partition_column: the column that holds the partition key; it must exist.
    :param existing: the table's columns → their types, as the warehouse names them.
    :param incoming: the outputs' columns → the types this sink would create for them.
    :param fits: whether a column of the first type can take values of the second.
    """
    if partition_column not in existing:
        raise SchemaMismatchError(
            f"Table {table} has no partition column {partition_column!r}: it was not created by "
            "this sink. Choose another table, or add the column."
        )
    for name, dtype in incoming.items():
        if name not in existing:
            raise SchemaMismatchError(
                f"Table {table} has no column {name!r} ({dtype}) that the outputs carry: add it "
                f"(ALTER TABLE {table} ADD COLUMN {name} {dtype}) or write to a new table."
            )
        if not fits(existing[name], dtype):
            raise SchemaMismatchError(
                f"Column {name!r} of table {table} is {existing[name]} but the outputs hold {dtype}: "
                "alter the column or write to a new table."
            )


def check_partition_column_absent(partition_column: str, names: Sequence[str]) -> None:
    """Refuse outputs that carry a column named like the partition column."""
    if partition_column in names:
        raise SchemaMismatchError(
            f"The outputs already have a column {partition_column!r}, which is the partition "
            "column: rename that output column or choose another partition_column."
        )


def parts_schema(parts: Sequence[str | Path]) -> pa.Schema:
    """The schema that every part shares (read from the footers); a part that differs is named.

    Parts may differ in nullability only: a part's column is REQUIRED where its chunk held no nulls. The
    schema returned has every column nullable, as the tables and datasets that the sinks write have.
    """
    import pyarrow as pa

    from airflow_batch_infer.parquet_files import open_parquet

    if not parts:
        raise ValueError("No part files to persist.")
    schema = None
    for part in parts:
        found = open_parquet(part).schema_arrow.remove_metadata()
        found = pa.schema([f.with_nullable(True) for f in found])
        if schema is None:
            schema = found
        elif not found.equals(schema):
            raise SchemaMismatchError(f"Part {part} has columns {found} but the first part has {schema}.")
    assert schema is not None
    return schema


def parts_rows(parts: Sequence[str | Path]) -> int:
    """Rows in the parts, from their footers."""
    from airflow_batch_infer.parquet_files import open_parquet

    return sum(open_parquet(p).metadata.num_rows for p in parts)


def iter_part_batches(parts: Sequence[str | Path], batch_rows: int = 50_000) -> Iterator[pa.RecordBatch]:
    """The parts' rows as record batches, one part after the other: memory holds one batch."""
    from airflow_batch_infer.parquet_files import open_parquet

    for part in parts:
        yield from open_parquet(part).iter_batches(batch_size=batch_rows)


class WarehouseSink(ABC):
    """Replaces a run's partition of the output table (and of its rejects table) in one atomic step.

    :param table: output table (``table`` or ``schema.table``); rejects go to ``<table>_rejects``.
    :param partition_column: column holding the partition key.
    :param create_table: create the tables from the outputs' schema when they do not exist.
    """

    name: str

    def __init__(
        self, table: str, partition_column: str = "batch_partition", create_table: bool = True
    ) -> None:
        qualified_table(table)
        self.table = table
        self.rejects_table = table + REJECTS_SUFFIX
        self.partition_column = validate_identifier(partition_column, "partition column")
        self.create_table = create_table

    def incoming_schema(self, parts: Sequence[str | Path]) -> pa.Schema:
        """The schema the parts share (:func:`parts_schema`), refused where a column is named like the
        partition column."""
        schema = parts_schema(parts)
        check_partition_column_absent(self.partition_column, schema.names)
        return schema

    def _result(
        self, partition: str, rows: int, rejected: int, replaced: int, location: str
    ) -> PersistResult:
        """What :meth:`replace_partition` returns for this sink's two tables."""
        return PersistResult(self.table, self.rejects_table, partition, rows, rejected, replaced, location)

    @abstractmethod
    def replace_partition(
        self, partition: str, output_parts: Sequence[str | Path], reject_parts: Sequence[str | Path]
    ) -> PersistResult:
        """Replace ``partition`` of the tables with the rows of the part files, all or nothing.

        :param partition: the partition key (see :func:`~airflow_batch_infer.partition.validate_partition`).
        :param output_parts: the run's output part files: local paths or object store locations.
        :param reject_parts: the run's rejects part files.
        """
