"""A PostgreSQL query exported in parallel ranges of an integer column, all in one snapshot.

The stage task opens one ``READ ONLY``, ``REPEATABLE READ`` transaction and exports its snapshot
(``pg_export_snapshot()``). In that snapshot it reads the query's columns, then the count, minimum and
maximum of the split column, and cuts the values into ranges that each span a whole number of the
planned chunks (so the chunk count stays about rows / ``chunk_rows``), plus one range for the rows whose
split value is null; a second pass counts each range's rows. Up to ``export_parallelism`` workers (threads,
each its own ADBC connection) import the snapshot in a ``READ ONLY``, ``REPEATABLE READ`` transaction
and export their ranges as ``SELECT <columns> FROM (<query>) AS q WHERE q.<split> >= lo AND q.<split> < hi``,
read as Arrow record batches (binary ``COPY``) and written into chunk files as the serial copy writes them.
Every worker sees the same snapshot: rows committed after it was exported reach none of them.

Where the query does not allow ranges it is read as one stream (``SQLQuerySource.open``), and one log
line says why: ``export_parallelism=1``; DuckDB or another database; no
``split_column`` and no ``row_id_column`` to split on, or a split column that is not an integer;
a query that is not a plain ``SELECT`` or writes (``INSERT``, ``UPDATE``, ``DELETE``, ``FOR UPDATE``,
``INTO``: the stream refuses it as it always did); a query that orders or limits its rows at its top level
(``ORDER BY``, ``LIMIT``, ``OFFSET``, ``FETCH``), whose order (and the generated ids that follow it) or row
set ranges would not keep; and a column of a type the stream converts by its values (``interval``, ...).
The workers run in transactions of their own: functions such as ``now()`` or ``random()`` are evaluated per
range, and a range that returns another number of rows than counted fails the stage.

Generated row ids (no ``row_id_column``) run 0, 1, 2... over the ranges in order of their values, the null
range last; within a range, in the order PostgreSQL returns its rows. The workers turn off synchronized
scans and parallel plans, so the same snapshot (and the same plan) staged twice gives every row the same id.

Memory: each worker holds one record batch (ADBC's default, about 16 MB) and its chunk file's buffers.

DuckDB stays serial: one DuckDB query already runs on all cores. Ranges, each a cursor of its own writing
its own chunks, measured no faster (``benchmarks/sql_export.py --duckdb``, 2,000,000 rows, 2 cores:
0.97 and 1.04 of the serial time with 2 and 4 ranges), before the counts that ids would need.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import sqlparse
from sqlparse import sql as sql_tokens
from sqlparse import tokens as T

from airflow_batch_infer.copy_staging import _ChunkWriter, _write_chunks
from airflow_batch_infer.errors import StagingError
from airflow_batch_infer.sinks.postgres import _libpq_uri
from airflow_batch_infer.sources.base import Source
from airflow_batch_infer.sources.sql import _PG_NUMERIC, _PG_TYPES, SQLQuerySource, _tuples, query_connection
from airflow_batch_infer.staging import DEFAULT_ROW_ID_COLUMN, ChunkDescriptor, Manifest, check_columns
from airflow_batch_infer.staging_request import StagingRequest

log = logging.getLogger(__name__)

_INTEGERS = {20, 21, 23}  # bigint, smallint, integer
_CASTS = {114: "text", 2950: "text", 3802: "text", 26: "int8"}  # json, uuid, jsonb as text; oid as int8
_LIMITING = {"ORDER BY", "LIMIT", "OFFSET", "FETCH", "INTO"}
_SNAPSHOT_ID = re.compile(r"^[0-9A-Fa-f-]+$")
_NOT_POSTGRES = "the query runs on DuckDB (which runs one query on all cores already) or another database"
_SERIAL_HINT = "Set export_parallelism=1 to read it as one stream."


@dataclass
class _Range:
    """One range of split values: its condition, rows counted in the snapshot, and where it is written."""

    label: str
    where: str
    rows: int = 0
    first_id: int = 0
    first_chunk: int = 0
    rows_per_chunk: int = 1
    chunks: int = 0


class _Stopped(Exception):
    """Another worker failed: this one stops too."""


def copy_ranges(source: Source, request: StagingRequest) -> Manifest | None:
    """Copy ``source`` into chunk files in parallel ranges; ``None`` where it must be read as one stream.

    The arguments are :func:`~airflow_batch_infer.copy_staging.copy_rows`'s.
    """
    if not isinstance(source, SQLQuerySource):
        return None
    hook = None
    reason = "export_parallelism=1" if source.export_parallelism <= 1 else None
    if reason is None:
        hook = source.postgres_hook()
        reason = _static_reason(source, request.row_id_column) if hook else _NOT_POSTGRES
    if reason:
        log.info("Exporting the query serially, as one stream: %s.", reason)
        return None
    with query_connection(hook, source.conn_id) as connection:
        cursor = connection.cursor()
        # The transaction's first statement: it can only read, and its snapshot is the whole export's.
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cursor.execute("SELECT pg_export_snapshot()")
        snapshot = str(_tuples(cursor.fetchall())[0][0])
        sql = _rendered(connection, source.sql, source.parameters)
        cursor.execute(f"SELECT * FROM (\n{sql}\n) AS q LIMIT 0")
        schema, _ = source._schema(cursor.description, [], True)
        oids = {str(d[0]): d[1] for d in cursor.description}
        check_columns(schema.names, request.columns, request.row_id_column, source.description)
        split = source.split_column or str(request.row_id_column)
        if split not in schema.names:
            raise StagingError(f"split_column {split!r} is not a column of the query: {schema.names}.")
        wanted = request.keep or schema.names
        reason = _column_reason(split, oids, wanted)
        if reason:
            log.info("Exporting the query serially, as one stream: %s.", reason)
            return None
        rows_per_chunk, ranges = _plan(cursor, sql, split, source.export_parallelism, request)
        select = f"SELECT {', '.join(_column(c, oids[c]) for c in wanted)} FROM (\n{sql}\n) AS q WHERE "
        target = pa.schema([schema.field(c) for c in wanted])
        export = _Export(
            source, _libpq_uri(hook), snapshot, select, target, request.run_dir, request.row_id_column
        )
        chunks = export.run(ranges)
    request.check_unique_ids([c.path for c in chunks])
    if request.generated_ids:
        target = target.insert(0, pa.field(request.id_column, pa.int64()))
    return request.manifest(source.description, chunks, target, rows_per_chunk, sum(c.rows for c in chunks))


def _static_reason(source: SQLQuerySource, row_id_column: str | None) -> str | None:
    """Why the query cannot be read in ranges, as far as its text and options tell (``None``: it can)."""
    if not (source.split_column or row_id_column):
        return "no split_column given, and no row_id_column to split on"
    statement = sqlparse.parse(source.sql)[0]
    if statement.get_type() != "SELECT":
        return "the statement is not a plain SELECT"
    writes = sorted({t.normalized for t in statement.flatten() if t.ttype in T.Keyword.DML} - {"SELECT"})
    if writes:
        return f"the statement holds {', '.join(writes)}"
    limiting = sorted(_top_level_keywords(statement) & _LIMITING)
    if limiting:
        return f"the query has {' and '.join(limiting)} at its top level, which ranges would not keep"
    return None


def _top_level_keywords(group: sql_tokens.TokenList) -> set[str]:
    """Keywords of the statement outside parentheses (subqueries, window clauses, CTE bodies)."""
    found = set()
    for token in group.tokens:
        if isinstance(token, sql_tokens.Parenthesis):
            continue
        if token.is_group:
            found |= _top_level_keywords(token)
        elif token.ttype in T.Keyword:
            found.add(token.normalized)
    return found


def _column_reason(split: str, oids: dict[str, Any], wanted: Sequence[str]) -> str | None:
    """Why the columns do not allow ranges: a split column that is not an integer, a type read by value."""
    if oids[split] not in _INTEGERS:
        return f"split column {split!r} is not an integer (type oid {oids[split]})"
    by_value = [c for c in wanted if oids[c] not in _PG_TYPES and oids[c] != _PG_NUMERIC]
    if by_value:
        return f"column(s) {by_value} have types whose Arrow type the stream takes from their values"
    return None


def _rendered(connection: Any, sql: str, parameters: Any) -> str:
    """The query with its parameters bound by the driver's own quoting (psycopg's client-side binding)."""
    if parameters is None:
        return sql
    try:
        import psycopg
    except ImportError:  # psycopg2 only
        psycopg = None
    if psycopg is not None and isinstance(connection, psycopg.Connection):
        return psycopg.ClientCursor(connection).mogrify(sql, parameters)
    with connection.cursor() as cursor:
        text = cursor.mogrify(sql, parameters)
    return text.decode() if isinstance(text, bytes) else str(text)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _column(name: str, oid: Any) -> str:
    cast = _CASTS.get(oid)
    return f"q.{_quote(name)}::{cast} AS {_quote(name)}" if cast else f"q.{_quote(name)}"


def _plan(
    cursor: Any,
    sql: str,
    split: str,
    workers: int,
    request: StagingRequest,
) -> tuple[int, list[_Range]]:
    """Rows per chunk and the ranges, with their rows counted in the snapshot, chunks and first ids."""
    column = f"q.{_quote(split)}"
    cursor.execute(f"SELECT count(*), count({column}), min({column}), max({column}) FROM (\n{sql}\n) AS q")
    total, present, low, high = _tuples(cursor.fetchall())[0]
    rows_per_chunk = request.rows_per_chunk(total)
    ranges = []
    if present:
        planned = math.ceil(present / rows_per_chunk)
        span = high - low + 1
        count = max(1, min(workers, planned, span))
        # Each range spans a whole number of the planned chunks, so uniform values fill whole chunks.
        bounds = [low + span * (planned * j // count) // planned for j in range(1, count)]
        for lo, hi in itertools.pairwise([None, *bounds, None]):
            where = [f"{column} >= {int(lo)}"] if lo is not None else []
            where += [f"{column} < {int(hi)}"] if hi is not None else []
            label = f"[{low if lo is None else lo}, {high + 1 if hi is None else hi})"
            ranges.append(_Range(label, " AND ".join(where) or f"{column} IS NOT NULL"))
        counts = ", ".join(f"count(*) FILTER (WHERE {r.where})" for r in ranges)
        cursor.execute(f"SELECT {counts} FROM (\n{sql}\n) AS q")
        for r, rows in zip(ranges, _tuples(cursor.fetchall())[0], strict=True):
            r.rows = int(rows)
        if sum(r.rows for r in ranges) != present:
            raise StagingError(
                f"The ranges of {split!r} count {sum(r.rows for r in ranges):,} rows, the query {present:,}: "
                f"it does not give the same rows twice in one snapshot (random()?). {_SERIAL_HINT}"
            )
    if total > present:
        ranges.append(_Range("null", f"{column} IS NULL", total - present))
    ranges = [r for r in ranges if r.rows]
    while sum(math.ceil(r.rows / rows_per_chunk) for r in ranges) > request.max_chunks:
        rows_per_chunk = math.ceil(rows_per_chunk * 1.05) + 1
    first_id = first_chunk = 0
    for r in ranges:
        r.rows_per_chunk = math.ceil(r.rows / math.ceil(r.rows / rows_per_chunk))  # even chunks in a range
        r.chunks = math.ceil(r.rows / r.rows_per_chunk)
        r.first_id, r.first_chunk = first_id, first_chunk
        first_id += r.rows
        first_chunk += r.chunks
    return rows_per_chunk, ranges


class _Export:
    """The workers of one ranged export: each imports the snapshot and writes its ranges' chunk files.

    :param source: the query.
    :param uri: the connection as a libpq URI (as the postgres sink connects).
    :param snapshot: the exported snapshot's id.
    :param select: the ranged query, up to its ``WHERE``.
    :param target: the staged columns and their Arrow types (those of a serial export).
    :param run_dir: the run folder.
    :param row_id_column: the query's own row id column (``None``: ids are generated).
    """

    def __init__(
        self,
        source: SQLQuerySource,
        uri: str,
        snapshot: str,
        select: str,
        target: pa.Schema,
        run_dir: str | Path,
        row_id_column: str | None,
    ) -> None:
        if not _SNAPSHOT_ID.match(snapshot):
            raise StagingError(f"Unexpected snapshot id {snapshot!r} from pg_export_snapshot().")
        self.source, self.uri, self.snapshot, self.select = source, uri, snapshot, select
        self.target, self.run_dir, self.row_id_column = target, run_dir, row_id_column
        self.stop = threading.Event()

    def run(self, ranges: list[_Range]) -> list[ChunkDescriptor]:
        """Export ``ranges`` with up to ``export_parallelism`` workers; the chunks in order."""
        if not ranges:
            return []
        shares: list[list[_Range]] = [[] for _ in range(min(self.source.export_parallelism, len(ranges)))]
        for r in sorted(ranges, key=lambda r: -r.rows):  # the largest range to the least loaded worker
            min(shares, key=lambda share: sum(x.rows for x in share)).append(r)
        log.info(
            "Exporting the query in %d range(s) of %s rows by %d worker(s) in snapshot %s: %s",
            len(ranges),
            f"{sum(r.rows for r in ranges):,}",
            len(shares),
            self.snapshot,
            ", ".join(f"{r.label} {r.rows:,}" for r in ranges),
        )
        with ThreadPoolExecutor(len(shares), thread_name_prefix="sql-range") as pool:
            futures = [pool.submit(self._worker, number, share) for number, share in enumerate(shares)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in done):
                self.stop.set()
            wait(futures)
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
        return sorted((c for f in futures for c in f.result()), key=lambda c: c.index)

    def _worker(self, number: int, share: list[_Range]) -> list[ChunkDescriptor]:
        """One worker: import the snapshot on a connection of its own, export its ranges into chunk files."""
        import adbc_driver_postgresql.dbapi as adbc

        generated = self.row_id_column is None
        id_column = self.row_id_column or DEFAULT_ROW_ID_COLUMN
        chunks: list[ChunkDescriptor] = []
        try:
            with adbc.connect(self.uri, autocommit=True) as connection, connection.cursor() as cursor:
                cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cursor.execute(f"SET TRANSACTION SNAPSHOT '{self.snapshot}'")
                # The same order of rows each time the snapshot is read: the order gives the generated ids.
                cursor.execute("SET LOCAL synchronize_seqscans = off")
                cursor.execute("SET LOCAL max_parallel_workers_per_gather = 0")
                for r in share:
                    cursor.execute(self.select + r.where)
                    out = _ChunkWriter(
                        self.run_dir,
                        "chunks",
                        r.rows_per_chunk,
                        id_column,
                        generated,
                        generated,
                        r.first_chunk,
                        r.first_id,
                    )
                    _write_chunks(self._batches(cursor.fetch_record_batch(), r), out)
                    chunks += out.chunks
                    log.info(
                        "Worker %d exported range %s: %s rows in %d chunk(s)",
                        number,
                        r.label,
                        f"{r.rows:,}",
                        len(out.chunks),
                    )
                cursor.execute("ROLLBACK")
        except adbc.Error as err:
            raise StagingError(f"The query failed on connection {self.source.conn_id!r}: {err}") from err
        return chunks

    def _batches(self, reader: pa.RecordBatchReader, r: _Range) -> Iterator[pa.RecordBatch]:
        """The range's batches as the target's types, refusing more (or fewer) rows than counted."""
        seen = 0
        for batch in reader:
            if self.stop.is_set():
                raise _Stopped
            seen += batch.num_rows
            if seen > r.rows:
                break
            arrays = []
            for field, column in zip(self.target, batch.columns, strict=True):
                if isinstance(column.type, pa.ExtensionType):
                    column = column.storage  # numeric: its text
                try:
                    arrays.append(column if column.type == field.type else column.cast(field.type))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                    raise StagingError(
                        f"Column {field.name!r} of the query does not fit {field.type}: {err}."
                    ) from err
            yield pa.RecordBatch.from_arrays(arrays, schema=self.target)
        if seen != r.rows:
            raise StagingError(
                f"Range {r.label} returned {'more than ' if seen > r.rows else ''}{seen:,} rows where the "
                f"snapshot counted {r.rows:,}: the query does not give the same rows in every transaction "
                f"(now(), random()?). {_SERIAL_HINT}"
            )
