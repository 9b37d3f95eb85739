"""PostgresSink: replace a partition of a PostgreSQL table in one transaction, parts sent by binary COPY."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pyarrow as pa

from airflow_batch_infer.arrow_types import is_list
from airflow_batch_infer.sinks.base import (
    PersistResult,
    SchemaMismatchError,
    WarehouseSink,
    check_fit,
    iter_part_batches,
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


# udt name → the Arrow type that COPY BINARY sends for it, where one type fits every value accepted.
_TEXT_UDTS = {"text", "varchar", "bpchar"}
_WIRE_TYPES = {
    "bool": pa.bool_(),
    "int2": pa.int16(),
    "int4": pa.int32(),
    "int8": pa.int64(),
    "float4": pa.float32(),
    "float8": pa.float64(),
    "date": pa.date32(),
}
_STAGE_NAME = "_batch_infer_stage"
_STAGE = quote_identifier(_STAGE_NAME, "table")


def wire_type(udt: str, source: pa.DataType) -> pa.DataType | None:
    """The Arrow type to send, in binary, into a column of ``udt`` for values of type ``source``.

    Values are cast to it in Arrow (float32 into ``double precision``, int8 into ``smallint``, a fixed-size
    list into an array). ``None`` where binary cannot carry them exactly (floats into ``numeric``): they go
    as text, which PostgreSQL parses as the CSV load did.

    :param udt: the column's udt name (``float8``, ``_float4``).
    :param source: the Arrow type of the parts' column.
    """
    if udt.startswith("_"):
        element = wire_type(udt[1:], source.value_type) if is_list(source) else None
        return None if element is None else pa.list_(element)
    if udt in _TEXT_UDTS:
        return source if pa.types.is_large_string(source) else pa.string()
    if udt == "numeric":  # the driver writes integers and decimals as numeric, not floats
        return source if pa.types.is_integer(source) or pa.types.is_decimal(source) else None
    if udt in ("timestamp", "timestamptz"):
        return source if pa.types.is_timestamp(source) else None
    return _WIRE_TYPES.get(udt)


def _as_text(source: pa.DataType) -> pa.DataType:
    return pa.list_(pa.string()) if is_list(source) else pa.string()


def cast_column(column: pa.Array, target: pa.DataType) -> pa.Array:
    """``column`` as ``target``, the type it is sent as.

    A float widened to a wider float goes through its shortest decimal text, as the CSV load sent it:
    float32 0.1 lands in ``double precision`` as 0.1, not 0.10000000149011612.

    :param column: a column of a part's record batch.
    :param target: its type from :func:`wire_type`, or text.
    """
    if column.type == target:
        return column
    source, goal = column.type, target
    if is_list(source) and is_list(goal):
        source, goal = source.value_type, goal.value_type
    if pa.types.is_floating(source) and pa.types.is_floating(goal) and source != goal:
        return column.cast(_as_text(column.type)).cast(target)
    return column.cast(target)


def _libpq_uri(hook: Any) -> str:
    """The Airflow connection as a libpq URI, every field a query parameter, as ``get_conn`` would connect.

    :param hook: a ``PostgresHook``; its extras (``sslmode``, ``options``) pass through, IAM tokens too.
    """
    conn = hook.connection
    login, password, port = conn.login, conn.password, conn.port
    if conn.extra_dejson.get("iam", False):
        login, password, port = hook.get_iam_token(conn)
    fields: dict[str, Any] = {
        "host": conn.host,
        "port": port,
        "user": login,
        "password": password,
        "dbname": hook.database or conn.schema,
    }
    fields.update({k: v for k, v in conn.extra_dejson.items() if k not in hook.ignored_extra_options})
    present = {k: str(v) for k, v in fields.items() if v is not None and v != ""}
    return "postgresql://?" + urlencode(present, quote_via=quote)


class _WireBatches:
    """The parts' rows as the batches COPY sends: partition key first, each column cast to its wire type.

    Memory holds one batch. The driver reports an error raised while reading the parts as text only, so
    it is kept in :attr:`error` to be raised again as itself.
    """

    def __init__(
        self, parts: Sequence[str | Path], partition: str, schema: pa.Schema, batch_rows: int
    ) -> None:
        self.parts = parts
        self.partition = partition
        self.schema = schema
        self.batch_rows = batch_rows
        self.error: Exception | None = None

    def reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.schema, self._batches())

    def _batches(self) -> Iterator[pa.RecordBatch]:
        try:
            for batch in iter_part_batches(self.parts, self.batch_rows):
                key = pa.repeat(pa.scalar(self.partition, self.schema.field(0).type), batch.num_rows)
                fields = list(self.schema)[1:]
                columns = [cast_column(c, f.type) for c, f in zip(batch.columns, fields, strict=True)]
                yield pa.RecordBatch.from_arrays([key, *columns], schema=self.schema)
        except Exception as err:
            self.error = err
            raise


class PostgresSink(WarehouseSink):
    """Replace a partition of a PostgreSQL table in one transaction: DELETE the partition, COPY the parts.

    The rows stream from the Parquet parts as Arrow record batches into ``COPY ... FROM STDIN`` in binary
    (the ADBC PostgreSQL driver's ``adbc_ingest``), one batch at a time, so memory does not grow with the
    run and PostgreSQL parses no text. Each column is cast in Arrow to the exact type of the table's
    column; lists become arrays. Floats into a ``numeric`` column, or the key into a partition column that
    is not text, cannot go in binary: such a table is loaded through a temporary table where those columns
    are text, then ``INSERT ... SELECT`` casts them, as PostgreSQL parsed the CSV that this sink once sent.

    Readers see the old partition until the commit, then the new one. Two runs replacing the same
    partition at once are serialised by a transaction-level advisory lock on the table's oid and the
    partition (``t`` and ``public.t`` are one table), so they cannot double it.

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

    def get_conn(self, hook: Any) -> Any:
        """An ADBC DB-API connection (autocommit off) to the hook's database."""
        import adbc_driver_postgresql.dbapi

        return adbc_driver_postgresql.dbapi.connect(_libpq_uri(hook), autocommit=False)

    def replace_partition(
        self, partition: str, output_parts: Sequence[str | Path], reject_parts: Sequence[str | Path]
    ) -> PersistResult:
        hook = self.get_hook()
        connection = self.get_conn(hook)
        try:
            with connection.cursor() as cursor:
                replaced, rows = self._replace(cursor, self.table, partition, output_parts)
                _, rejected = self._replace(cursor, self.rejects_table, partition, reject_parts)
            connection.commit()
        except BaseException:
            with contextlib.suppress(Exception):  # the error that stopped the load matters, not this one
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
        schema = self.incoming_schema(parts)
        incoming = {f.name: postgres_type(f.name, f.type) for f in schema}
        for name in incoming:
            quote_identifier(name, "column")
        if self._columns(cursor, target) is None:
            if not self.create_table:
                raise SchemaMismatchError(f"Table {table} does not exist and create_table is off.")
            self._create(cursor, table, incoming)
        cursor.execute(
            "SELECT pg_advisory_xact_lock(to_regclass($1)::oid::int, hashtext($2))",
            parameters=(target, partition),
        )
        existing = self._columns(cursor, target) or {}
        accepted = {pg_type: {_describe(u) for u in udts} for pg_type, udts in incoming.values()}
        check_fit(
            table,
            self.partition_column,
            {name: _describe(udt) for name, (udt, _) in existing.items()},
            {name: pg_type for name, (pg_type, _) in incoming.items()},
            fits=lambda have, want: have == want or have in accepted[want],
        )
        key = self._key(existing)
        column = quote_identifier(self.partition_column, "partition column")
        cursor.execute(f"SELECT count(*) FROM {target} WHERE {column} = {key}", parameters=(partition,))
        before = int(cursor.fetchone()[0])
        cursor.execute(f"DELETE FROM {target} WHERE {column} = {key}", parameters=(partition,))
        self._copy(cursor, table, schema, existing, partition, parts)
        cursor.execute(f"SELECT count(*) FROM {target} WHERE {column} = {key}", parameters=(partition,))
        return before, int(cursor.fetchone()[0])

    def _key(self, existing: Mapping[str, tuple[str, str]]) -> str:
        """The partition key's placeholder: parameters are text, cast where the column is of another type."""
        udt, declared = existing[self.partition_column]
        return "$1" if udt in _TEXT_UDTS else f"CAST($1 AS {declared})"

    def _copy(
        self,
        cursor: Any,
        table: str,
        schema: pa.Schema,
        existing: Mapping[str, tuple[str, str]],
        partition: str,
        parts: Sequence[str | Path],
    ) -> None:
        """COPY the parts in binary into the table, or through a temporary table where some go as text."""
        key_udt = existing[self.partition_column][0]
        wire = [(self.partition_column, pa.string() if key_udt in _TEXT_UDTS else None)]
        wire += [(f.name, wire_type(existing[f.name][0], f.type)) for f in schema]
        as_text = {name for name, arrow_type in wire if arrow_type is None}
        sources = {self.partition_column: pa.string(), **{f.name: f.type for f in schema}}
        sent = pa.schema([(n, _as_text(sources[n]) if t is None else t) for n, t in wire])
        batches = _WireBatches(parts, partition, sent, self.batch_rows)
        db_schema, name = split_table(table)
        try:
            if as_text:
                self._copy_staged(cursor, qualified_table(table), sent.names, existing, as_text, batches)
            else:
                cursor.adbc_ingest(name, batches.reader(), mode="append", db_schema_name=db_schema)
        except Exception as err:
            if batches.error is not None:  # reading the parts failed, not PostgreSQL
                raise batches.error from err
            raise

    @staticmethod
    def _copy_staged(
        cursor: Any,
        target: str,
        names: Sequence[str],
        existing: Mapping[str, tuple[str, str]],
        as_text: set[str],
        batches: _WireBatches,
    ) -> None:
        """COPY into a temporary table whose columns ``as_text`` are text, then cast those into the table."""
        columns = {n: quote_identifier(n, "column") for n in names}
        text = {n: "text[]" if existing[n][0].startswith("_") else "text" for n in as_text}
        shape = ", ".join(f"{c}::{text[n]} AS {c}" if n in as_text else c for n, c in columns.items())
        cursor.execute(
            f"CREATE TEMP TABLE {_STAGE} ON COMMIT DROP AS SELECT {shape} FROM {target} WITH NO DATA"
        )
        cursor.adbc_ingest(_STAGE_NAME, batches.reader(), mode="append", temporary=True)
        values = ", ".join(
            f"CAST({c} AS {existing[n][1]})" if n in as_text else c for n, c in columns.items()
        )
        cursor.execute(
            f"INSERT INTO {target} ({', '.join(columns.values())}) SELECT {values} FROM pg_temp.{_STAGE}"
        )
        cursor.execute(f"DROP TABLE pg_temp.{_STAGE}")

    def _create(self, cursor: Any, table: str, incoming: dict[str, tuple[str, set[str]]]) -> None:
        """Create the table and its index, after a lock on its name so that two runs create it once."""
        target = qualified_table(table)
        schema, name = split_table(table)
        cursor.execute(
            "SELECT pg_advisory_xact_lock(hashtext(COALESCE(NULLIF($1, ''), current_schema()) || '.' || $2))",
            parameters=(schema or "", name),
        )
        column = quote_identifier(self.partition_column, "partition column")
        columns = [f"{column} text NOT NULL"]
        columns += [
            f"{quote_identifier(name, 'column')} {pg_type}" for name, (pg_type, _) in incoming.items()
        ]
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {target} ({', '.join(columns)})")
        index = quote_identifier(f"{name}_{self.partition_column}_idx"[:63], "index")
        cursor.execute(f"CREATE INDEX IF NOT EXISTS {index} ON {target} ({column})")

    @staticmethod
    def _columns(cursor: Any, target: str) -> dict[str, tuple[str, str]] | None:
        """The table's columns → (udt name, declared type): ``("_float4", "real[]")``; ``None`` if absent.

        :param target: the quoted table name, found as PostgreSQL finds it (``search_path``).
        """
        cursor.execute(
            "SELECT a.attname, COALESCE(b.typname, t.typname), format_type(a.atttypid, a.atttypmod) "
            "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype "
            "WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            parameters=(target,),
        )
        rows = cursor.fetchall()
        return {str(c): (str(u), str(d)) for c, u, d in rows} if rows else None
