"""PostgresSink: replace a partition of a PostgreSQL table in one transaction, the parts sent by COPY."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from airflow_batch_infer.arrow_types import is_list
from airflow_batch_infer.sinks.base import (
    PersistResult,
    SchemaMismatchError,
    WarehouseSink,
    check_fit,
    check_partition_column_absent,
    iter_part_batches,
    parts_schema,
    qualified_table,
    quote_identifier,
    split_table,
)

# Arrow type → the PostgreSQL type a new table gets, and the udt names an existing column may have.
_SCALARS: list[tuple[Any, str, set[str]]] = [
    (pa.types.is_boolean, "boolean", {"bool"}),
    (lambda t: t in (pa.int8(), pa.int16(), pa.uint8()), "smallint", {"int2", "int4", "int8", "numeric"}),
    (lambda t: t in (pa.int32(), pa.uint16()), "integer", {"int4", "int8", "numeric"}),
    (lambda t: t in (pa.int64(), pa.uint32()), "bigint", {"int8", "numeric"}),
    (lambda t: t == pa.uint64(), "numeric(20,0)", {"numeric"}),
    (lambda t: t in (pa.float16(), pa.float32()), "real", {"float4", "float8", "numeric"}),
    (lambda t: t == pa.float64(), "double precision", {"float8", "numeric"}),
    (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "text", {"text", "varchar", "bpchar"}),
    (pa.types.is_date, "date", {"date"}),
    (lambda t: pa.types.is_timestamp(t) and t.tz is None, "timestamp", {"timestamp"}),
    (lambda t: pa.types.is_timestamp(t) and t.tz is not None, "timestamptz", {"timestamptz"}),
    (pa.types.is_null, "text", {"text", "varchar", "bpchar"}),
]
_UDT_NAMES = {
    "boolean": "bool",
    "smallint": "int2",
    "integer": "int4",
    "bigint": "int8",
    "real": "float4",
    "double precision": "float8",
    "text": "text",
    "date": "date",
    "timestamp": "timestamp",
    "timestamptz": "timestamptz",
}


def postgres_type(name: str, arrow_type: pa.DataType) -> tuple[str, set[str]]:
    """The PostgreSQL type for a column of ``arrow_type``, and the udt names an existing column may have.

    Lists of numbers or booleans (embeddings, several scores) become arrays (``real[]``).
    """
    if pa.types.is_decimal(arrow_type):
        return f"numeric({arrow_type.precision},{arrow_type.scale})", {"numeric"}
    if is_list(arrow_type):
        element, accepted = postgres_type(name, arrow_type.value_type)
        if is_list(arrow_type.value_type) or element in ("text", "date", "timestamp", "timestamptz"):
            raise SchemaMismatchError(
                f"Column {name!r} holds {arrow_type}: the postgres sink stores lists of numbers or booleans "
                "only."
            )
        return element + "[]", {"_" + a for a in accepted}
    for test, pg_type, accepted in _SCALARS:
        if test(arrow_type):
            return pg_type, accepted
    raise SchemaMismatchError(
        f"Column {name!r} holds {arrow_type}, which the postgres sink cannot store: cast it in the model's "
        "output mapping or leave it out."
    )


def _describe(udt: str) -> str:
    """A udt name as people write the type (``_float4`` → ``real[]``)."""
    names = {v: k for k, v in _UDT_NAMES.items()}
    if udt.startswith("_"):
        return names.get(udt[1:], udt[1:]) + "[]"
    return names.get(udt, udt)


def _csv_ready(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Turn list columns into PostgreSQL array literals (``{1,2,3}``); other columns stay as they are."""
    columns = []
    for column in batch.columns:
        if is_list(column.type):
            values = column.values if not pa.types.is_fixed_size_list(column.type) else column.flatten()
            text = pc.fill_null(pc.cast(values, pa.string()), "NULL")
            offsets = column.offsets if not pa.types.is_fixed_size_list(column.type) else None
            if offsets is None:
                size = column.type.list_size
                offsets = pa.array(range(0, (len(column) + 1) * size, size), pa.int32())
            as_lists = pa.ListArray.from_arrays(offsets, text, mask=column.is_null())
            joined = pc.binary_join(as_lists, ",")
            column = pc.binary_join_element_wise("{", joined, "}", "")
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


class _CsvStream(io.RawIOBase):
    """A readable file of CSV text made batch by batch from the parts: memory holds one batch."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size


def _csv_chunks(parts: Sequence[str | Path], partition: str, batch_rows: int) -> Iterator[bytes]:
    options = pacsv.WriteOptions(include_header=False, quoting_style="all_valid")
    for batch in iter_part_batches(parts, batch_rows):
        key = pa.array([partition] * batch.num_rows, pa.string())
        ready = _csv_ready(batch)
        full = pa.RecordBatch.from_arrays([key, *ready.columns], names=["_p", *ready.schema.names])
        sink = io.BytesIO()
        pacsv.write_csv(full, sink, options)
        yield sink.getvalue()


class PostgresSink(WarehouseSink):
    """Replace a partition of a PostgreSQL table in one transaction: DELETE the partition, COPY the parts.

    The rows stream from the Parquet parts as CSV into ``COPY ... FROM STDIN``, one record batch at a time,
    so memory does not grow with the run. Readers see the old partition until the commit, then the new
    one. Two runs replacing the same partition at once are serialised by a transaction-level advisory lock
    on (table, partition), so they cannot double it.

    :param table: output table (``table`` or ``schema.table``); rejects go to ``<table>_rejects``.
    :param postgres_conn_id: Airflow connection of type ``postgres``.
    :param partition_column: column holding the partition key.
    :param create_table: create the tables (and an index on the partition column) when they do not exist.
    :param batch_rows: rows per record batch sent.
    """

    name = "postgres"

    def __init__(
        self,
        table: str,
        postgres_conn_id: str = "postgres_default",
        partition_column: str = "batch_partition",
        create_table: bool = True,
        batch_rows: int = 50_000,
    ) -> None:
        super().__init__(table, partition_column, create_table)
        self.postgres_conn_id = postgres_conn_id
        self.batch_rows = int(batch_rows)

    def get_hook(self) -> Any:
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        return PostgresHook(postgres_conn_id=self.postgres_conn_id)

    def replace_partition(
        self, partition: str, output_parts: Sequence[str | Path], reject_parts: Sequence[str | Path]
    ) -> PersistResult:
        hook = self.get_hook()
        connection = hook.get_conn()
        try:
            connection.autocommit = False
            with connection.cursor() as cursor:
                replaced, rows = self._replace(cursor, self.table, partition, output_parts)
                _, rejected = self._replace(cursor, self.rejects_table, partition, reject_parts)
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        finally:
            connection.close()
        info = hook.get_connection(self.postgres_conn_id)
        return self._result(
            partition,
            rows,
            rejected,
            replaced,
            f"postgresql://{info.host}:{info.port or 5432}/{hook.database or info.schema}",
        )

    def _replace(
        self, cursor: Any, table: str, partition: str, parts: Sequence[str | Path]
    ) -> tuple[int, int]:
        """Delete then copy one table's partition inside the open transaction; (rows before, after)."""
        target = qualified_table(table)
        column = quote_identifier(self.partition_column, "partition column")
        schema = parts_schema(parts)
        check_partition_column_absent(self.partition_column, schema.names)
        incoming = {f.name: postgres_type(f.name, f.type) for f in schema}
        for name in incoming:
            quote_identifier(name, "column")
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{table}\x1f{partition}",))
        existing = self._columns(cursor, table)
        if existing is None:
            if not self.create_table:
                raise SchemaMismatchError(f"Table {table} does not exist and create_table is off.")
            self._create(cursor, table, incoming)
        else:
            accepted = {pg_type: {_describe(u) for u in udts} for pg_type, udts in incoming.values()}
            check_fit(
                table,
                self.partition_column,
                {name: _describe(udt) for name, udt in existing.items()},
                {name: pg_type for name, (pg_type, _) in incoming.items()},
                fits=lambda have, want: have == want or have in accepted[want],
            )
        cursor.execute(f"SELECT count(*) FROM {target} WHERE {column} = %s", (partition,))
        before = int(cursor.fetchone()[0])
        cursor.execute(f"DELETE FROM {target} WHERE {column} = %s", (partition,))
        names = ", ".join([column, *(quote_identifier(n, "column") for n in schema.names)])
        self._copy(cursor, f"COPY {target} ({names}) FROM STDIN WITH (FORMAT csv)", parts, partition)
        cursor.execute(f"SELECT count(*) FROM {target} WHERE {column} = %s", (partition,))
        return before, int(cursor.fetchone()[0])

    def _copy(self, cursor: Any, statement: str, parts: Sequence[str | Path], partition: str) -> None:
        chunks = _csv_chunks(parts, partition, self.batch_rows)
        if hasattr(cursor, "copy"):  # psycopg 3
            with cursor.copy(statement) as copy:
                for chunk in chunks:
                    copy.write(chunk)
        else:  # psycopg2
            cursor.copy_expert(statement, io.BufferedReader(_CsvStream(chunks), 1024 * 1024))

    def _create(self, cursor: Any, table: str, incoming: dict[str, tuple[str, set[str]]]) -> None:
        target = qualified_table(table)
        column = quote_identifier(self.partition_column, "partition column")
        columns = [f"{column} text NOT NULL"]
        columns += [
            f"{quote_identifier(name, 'column')} {pg_type}" for name, (pg_type, _) in incoming.items()
        ]
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {target} ({', '.join(columns)})")
        _, name = split_table(table)
        index = quote_identifier(f"{name}_{self.partition_column}_idx"[:63], "index")
        cursor.execute(f"CREATE INDEX IF NOT EXISTS {index} ON {target} ({column})")

    @staticmethod
    def _columns(cursor: Any, table: str) -> dict[str, str] | None:
        """The table's columns → udt names (``int8``, ``_float4``), or ``None`` when it does not exist."""
        schema, name = split_table(table)
        cursor.execute(
            "SELECT column_name, udt_name FROM information_schema.columns "
            "WHERE table_schema = COALESCE(%s, current_schema()) AND table_name = %s "
            "ORDER BY ordinal_position",
            (schema, name),
        )
        rows = cursor.fetchall()
        return {str(c): str(u) for c, u in rows} if rows else None
