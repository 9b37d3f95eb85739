"""Check a sink's existing output table against the outputs a run will write, at the run's start.

The same check as the sink makes when it persists (:func:`~airflow_batch_infer.sinks.base.check_fit`:
a missing column, or one of a type that cannot take the outputs', names the column and both types), made
before the server starts, so that a table that cannot take the outputs fails the run before any row is
scored. DuckDB and PostgreSQL tables are checked; other sinks check when they persist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from airflow_batch_infer.sinks import get_sink
from airflow_batch_infer.sinks.base import check_fit, check_partition_column_absent, qualified_table

CHECKED_SINKS = ("duckdb", "postgres")


def check_output_table(sink: str, options: Mapping[str, Any], table: str, schema: pa.Schema) -> str | None:
    """Check that ``table``, where it exists, takes the columns of ``schema``; say what was checked.

    :param sink: the sink's name.
    :param options: the sink's options (without ``table``).
    :param table: the output table.
    :param schema: the output parts' columns (:func:`~airflow_batch_infer.contract_checks.outputs_schema`).
    :returns: what was checked, for the log; ``None`` where nothing could be (another sink, no table yet).
    :raises SchemaMismatchError: naming the column and both types.
    """
    if sink not in CHECKED_SINKS:
        return None
    writer = get_sink(sink, table=table, **options)
    check_partition_column_absent(writer.partition_column, schema.names)
    if sink == "duckdb":
        return _check_duckdb(writer, schema)
    return _check_postgres(writer, schema)


def _check_duckdb(sink: Any, schema: pa.Schema) -> str | None:
    import duckdb

    if not Path(sink.database).is_file():
        return None
    # As DuckDB reads the parts back: Parquet has no fixed-size lists, so FLOAT[16] comes back FLOAT[].
    as_read = pa.schema(
        [
            f.with_type(pa.list_(f.type.value_type)) if pa.types.is_fixed_size_list(f.type) else f
            for f in schema
        ]
    )
    try:
        con = duckdb.connect(sink.database, read_only=True)
    except duckdb.IOException:  # held by a writer now: persist checks the table when it writes
        return None
    with con:
        existing = sink._columns(con, sink.table)
        if existing is None:
            return None
        con.register("outputs", pa.Table.from_batches([], schema=as_read))
        described = con.execute("DESCRIBE SELECT * FROM outputs").fetchall()
    incoming = {name: dtype for name, dtype, *_ in described}
    check_fit(sink.table, sink.partition_column, existing, incoming)
    return f"DuckDB table {sink.table} in {sink.database}"


def _check_postgres(sink: Any, schema: pa.Schema) -> str | None:
    from airflow_batch_infer.sinks.postgres import _describe, postgres_type

    incoming = {f.name: postgres_type(f.name, f.type) for f in schema}
    connection = sink.get_conn(sink.get_hook())
    try:
        with connection.cursor() as cursor:
            existing = sink._columns(cursor, qualified_table(sink.table))
    finally:
        with contextlib.suppress(Exception):
            connection.rollback()
        connection.close()
    if existing is None:
        return None
    accepted = {pg_type: {_describe(u) for u in udts} for pg_type, udts in incoming.values()}
    check_fit(
        sink.table,
        sink.partition_column,
        {name: _describe(udt) for name, (udt, _) in existing.items()},
        {name: pg_type for name, (pg_type, _) in incoming.items()},
        fits=lambda have, want: have == want or have in accepted[want],
    )
    return f"PostgreSQL table {sink.table}"
