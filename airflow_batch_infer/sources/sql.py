"""SQLQuerySource: the rows of one SQL query, streamed from any common-sql connection, or from DuckDB.

The query reads one consistent snapshot of the database (one statement, or ranges of it that all import
one exported snapshot); the stage task writes those rows into chunk files, and every mapped infer task
reads the chunks, never the table: a table that changes during the run does not change what is scored.

A query can only read: it must be one statement, PostgreSQL runs it (each range too) in a read-only
transaction, and DuckDB opens the database read-only with external access (files, URLs, extensions)
disabled. A query from a manual run's Params can so neither write nor reach outside the database it names.

Memory stays bounded: PostgreSQL rows come through a server-side (named) cursor, ``batch_rows`` at a time;
DuckDB hands over Arrow record batches directly; other DB-API drivers are read with ``fetchmany`` (whether
that streams depends on the driver).

A PostgreSQL query that allows it is exported in parallel ranges of an integer ``split_column`` instead,
all in one exported snapshot (:mod:`airflow_batch_infer.sources.sql_ranges`). DuckDB queries stay one
stream: DuckDB already runs one query on all cores, and ranges measured no faster (see that module).
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import sqlparse

from airflow_batch_infer.errors import StagingError
from airflow_batch_infer.paths import batch_infer_home
from airflow_batch_infer.sources.base import Source
from airflow_batch_infer.sql_options import check_export_parallelism, check_split_column

# PostgreSQL type OIDs → Arrow types, so that every chunk gets the same schema whatever its values.
_PG_TYPES: dict[int, pa.DataType] = {
    16: pa.bool_(),
    17: pa.binary(),
    18: pa.string(),
    19: pa.string(),
    20: pa.int64(),
    21: pa.int16(),
    23: pa.int32(),
    25: pa.string(),
    26: pa.int64(),
    114: pa.string(),
    700: pa.float32(),
    701: pa.float64(),
    1000: pa.list_(pa.bool_()),
    1005: pa.list_(pa.int16()),
    1007: pa.list_(pa.int32()),
    1009: pa.list_(pa.string()),
    1016: pa.list_(pa.int64()),
    1021: pa.list_(pa.float32()),
    1022: pa.list_(pa.float64()),
    1042: pa.string(),
    1043: pa.string(),
    1082: pa.date32(),
    1114: pa.timestamp("us"),
    1184: pa.timestamp("us", tz="UTC"),
    2950: pa.string(),
    3802: pa.string(),
}
_PG_NUMERIC = 1700
_TO_TEXT = {114, 2950, 3802}  # json, uuid, jsonb: stored as text


class SQLQuerySource(Source):
    """The rows of a SQL query.

    :param sql: the query (one ``SELECT``); its columns become the staged columns.
    :param conn_id: an Airflow connection whose hook is a common-sql ``DbApiHook`` (``postgres``, ...),
        or of type ``duckdb`` (host: the database file). ``None``: the embedded DuckDB file ``database``.
    :param parameters: query parameters, in the driver's style (``%(name)s`` for psycopg, ``$name`` or
        ``?`` for DuckDB); values never go into the SQL text.
    :param database: the DuckDB file when ``conn_id`` is ``None`` (default
        ``$BATCH_INFER_HOME/warehouse.duckdb``).
    :param batch_rows: rows fetched per round trip, and per record batch.
    :param split_column: an integer column of the query whose value ranges PostgreSQL exports in
        parallel; ``None``: the ``row_id_column`` of the stage, when it is an integer. Ranges are used
        only where the query allows them (see :mod:`~airflow_batch_infer.sources.sql_ranges`).
    :param export_parallelism: connections exporting ranges at once (``None``: the cores, at most 4);
        ``1`` reads the query as one stream.
    """

    def __init__(
        self,
        sql: str,
        conn_id: str | None = None,
        parameters: Mapping[str, Any] | Sequence[Any] | None = None,
        database: str | None = None,
        batch_rows: int = 50_000,
        split_column: str | None = None,
        export_parallelism: int | str | None = None,
    ) -> None:
        if not sql or not sql.strip():
            raise StagingError("The SQL query is empty.")
        statements = [s for s in sqlparse.split(sql) if s.strip().rstrip(";").strip()]
        if len(statements) != 1:
            raise StagingError(
                f"The SQL must be exactly one statement (a SELECT); it holds {len(statements)}: "
                + " | ".join(" ".join(s.split())[:60] for s in statements)
            )
        self.sql = sql.strip().rstrip(";")
        self.conn_id = conn_id
        self.parameters = parameters
        self.database = database
        self.batch_rows = int(batch_rows)
        self.split_column = check_split_column(split_column)
        self.export_parallelism = check_export_parallelism(export_parallelism)

    @property
    def description(self) -> str:
        where = f"connection {self.conn_id}" if self.conn_id else f"DuckDB {self._duckdb_file()}"
        text = " ".join(self.sql.split())
        return f"SQL on {where}: {text[:200]}{'...' if len(text) > 200 else ''}"

    def _duckdb_file(self, conn: Any = None) -> str:
        if conn is not None:
            return str(conn.host or conn.schema or conn.extra_dejson.get("database") or ":memory:")
        return str(self.database or batch_infer_home() / "warehouse.duckdb")

    def postgres_hook(self) -> Any | None:
        """The ``PostgresHook`` of ``conn_id``; ``None`` when the query runs on DuckDB or another database."""
        if self.conn_id is None:
            return None
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(self.conn_id)
        if conn.conn_type == "duckdb":
            return None
        hook = conn.get_hook()
        return hook if _is_postgres(hook) else None

    @contextmanager
    def open(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatchReader]:
        if self.conn_id is None:
            with self._open_duckdb(self._duckdb_file()) as reader:
                yield reader
            return
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(self.conn_id)
        if conn.conn_type == "duckdb":
            with self._open_duckdb(self._duckdb_file(conn)) as reader:
                yield reader
            return
        hook = conn.get_hook()
        from airflow.providers.common.sql.hooks.sql import DbApiHook

        if not isinstance(hook, DbApiHook):
            raise StagingError(
                f"Connection {self.conn_id!r} (type {conn.conn_type}) has no SQL hook: use a common-sql "
                "connection such as postgres, or duckdb."
            )
        with self._open_dbapi(hook) as reader:
            yield reader

    @contextmanager
    def _open_duckdb(self, database: str) -> Iterator[pa.RecordBatchReader]:
        import duckdb

        if database != ":memory:" and not Path(database).exists():
            raise StagingError(f"DuckDB database {database} does not exist.")
        read_only = database != ":memory:"
        with duckdb.connect(database, read_only=read_only, config={"enable_external_access": False}) as con:
            try:
                relation = con.sql(self.sql, params=self.parameters)
                if relation is None:
                    raise StagingError("The SQL statement returns no rows (is it a SELECT?).")
                # A relation streams Arrow batches without copying the result (DuckDB 2: to_arrow_reader).
                stream = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
                yield stream(self.batch_rows)
            except duckdb.Error as err:
                raise StagingError(f"The query failed on DuckDB {database}: {err}") from err

    @contextmanager
    def _open_dbapi(self, hook: Any) -> Iterator[pa.RecordBatchReader]:
        postgres = _is_postgres(hook)
        with query_connection(hook, self.conn_id) as connection:
            if postgres:
                with connection.cursor() as first:  # the transaction's first statement: it can only read
                    first.execute("SET TRANSACTION READ ONLY")
                # A named cursor lives on the server: rows come batch_rows at a time, not all at once.
                cursor = connection.cursor(name=f"batch_infer_{uuid.uuid4().hex[:12]}")
                cursor.itersize = self.batch_rows
            else:
                cursor = connection.cursor()
            try:
                cursor.execute(self.sql, self.parameters)
                first = _tuples(cursor.fetchmany(self.batch_rows))
                schema, converters = self._schema(cursor.description, first, postgres)
                yield pa.RecordBatchReader.from_batches(
                    schema, self._batches(cursor, first, schema, converters)
                )
            finally:
                cursor.close()

    def _schema(
        self, description: Sequence[Any] | None, first: Sequence[Sequence[Any]], postgres: bool
    ) -> tuple[pa.Schema, list[Any]]:
        if not description:
            raise StagingError("The SQL statement returns no rows (is it a SELECT?).")
        names = [str(d[0]) for d in description]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise StagingError(f"The query returns column(s) {duplicates} more than once: alias them.")
        fields, converters = [], []
        for i, column in enumerate(description):
            oid = column[1] if postgres else None
            arrow_type: pa.DataType | None = _PG_TYPES.get(oid) if isinstance(oid, int) else None
            converter = None
            if oid == _PG_NUMERIC:
                precision, scale = column[4], column[5]
                arrow_type = pa.decimal128(precision, scale) if precision else pa.float64()
                converter = None if precision else _to_float
            elif oid in _TO_TEXT:
                converter = _to_text
            if arrow_type is None:  # other databases: from the first rows' values
                arrow_type = pa.array([row[i] for row in first]).type if first else pa.string()
            fields.append(pa.field(names[i], arrow_type))
            converters.append(converter)
        return pa.schema(fields), converters

    def _batches(
        self, cursor: Any, rows: Sequence[Sequence[Any]], schema: pa.Schema, converters: list[Any]
    ) -> Iterator[pa.RecordBatch]:
        while rows:
            arrays = []
            for i, field in enumerate(schema):
                values = [row[i] for row in rows]
                if converters[i] is not None:
                    values = [None if v is None else converters[i](v) for v in values]
                try:
                    arrays.append(pa.array(values, type=field.type))
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as err:
                    hint = (
                        " It held only nulls in the first rows: CAST it in the query."
                        if pa.types.is_null(field.type)
                        else ""
                    )
                    raise StagingError(
                        f"Column {field.name!r} of the query does not fit {field.type}: {err}.{hint}"
                    ) from err
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)
            rows = _tuples(cursor.fetchmany(self.batch_rows))


def _is_postgres(hook: Any) -> bool:
    return type(hook).__name__ == "PostgresHook" or getattr(hook, "conn_type", "") == "postgres"


def _to_float(value: Any) -> float:
    return float(value) if isinstance(value, Decimal) else value


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def _tuples(rows: Sequence[Any]) -> Sequence[Sequence[Any]]:
    """Rows as sequences, also from a connection configured to return dictionaries."""
    return [tuple(r.values()) for r in rows] if rows and isinstance(rows[0], Mapping) else rows


@contextmanager
def query_connection(hook: Any, conn_id: str | None) -> Iterator[Any]:
    """A connection of ``hook`` for queries that only read: a driver error becomes a :class:`StagingError`
    that names the connection, and on the way out the transaction is rolled back (which ends its snapshot)
    and the connection closed.

    :param hook: a common-sql hook.
    :param conn_id: its connection id, for the error message.
    """
    connection = hook.get_conn()
    driver_error = _driver_error(connection)
    try:
        yield connection
    except driver_error as err:
        raise StagingError(f"The query failed on connection {conn_id!r}: {err}") from err
    finally:
        try:
            connection.rollback()  # it only read: end the snapshot's transaction
        finally:
            connection.close()


def _driver_error(connection: Any) -> type[BaseException]:
    """The DB-API ``Error`` class of the connection's driver (errors of the query, not of the caller)."""
    module = sys.modules.get(type(connection).__module__.split(".")[0])
    error = getattr(module, "Error", None)
    return error if isinstance(error, type) and issubclass(error, BaseException) else _NoError


class _NoError(Exception):
    """Matches nothing: a driver without a DB-API ``Error`` class."""
