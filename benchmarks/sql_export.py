"""Stage of one SQL query: serial export against parallel ranges (export_parallelism 2 and 4), side by side.

Loads ``--rows`` rows into a PostgreSQL table of a schema of its own (dropped after), then stages the same
query (``split_column="id"``, generated row ids) serially and in ranges, alternating, ``--repeat`` times
each, and prints the median seconds and the ratios ``sql_ranged_2/serial=`` and ``sql_ranged_4/serial=``
(time ratios: below 1 is faster). ``sql_one_range/serial=`` is the ranged path with a single range (one
ADBC stream, no parallelism): it tells what the driver alone gives. Every run's rows are checked: the
count, and the sum of the generated ids (each of 0..rows-1 exactly once). ``--duckdb`` times the same for
a DuckDB file, where ranges are a prototype written here (the package keeps DuckDB serial). Usage::

    python benchmarks/sql_export.py [--rows N] [--repeat K] [--dsn postgresql://...] [--duckdb]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow_batch_infer.staging import Manifest, stage_source

CONN_ID = "abi_bench_pg"


def check(manifest: Manifest, rows: int) -> None:
    """The staged rows are ``rows`` rows, with ids 0..rows-1 each once."""
    ids = sum(pq.read_table(c.path, columns=["row_id"]).column(0).to_numpy().sum() for c in manifest.chunks)
    if manifest.total_rows != rows or int(ids) != rows * (rows - 1) // 2:
        raise SystemExit(f"wrong rows: {manifest.total_rows} staged, id sum {ids}")


def timed(stage, rows: int) -> float:
    with tempfile.TemporaryDirectory(prefix="abi-sql-bench-") as run_dir:
        start = time.perf_counter()
        manifest = stage(Path(run_dir))
        seconds = time.perf_counter() - start
        check(manifest, rows)
    return seconds


def report(prefix: str, times: dict[str, list[float]]) -> None:
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    for mode, median in medians.items():
        print(f"{prefix}_{mode}: median {median:.2f} s over {len(times[mode])} runs {times[mode]}")
    for mode, median in medians.items():
        if mode != "serial":
            print(f"{prefix}_{mode}/serial={median / medians['serial']:.3f}")


def postgres(rows: int, repeat: int, dsn: str, chunk_rows: int) -> None:
    import psycopg

    from airflow_batch_infer.sources import SQLQuerySource

    os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = dsn
    schema = f"abi_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            admin.execute(
                f'CREATE TABLE "{schema}".events AS SELECT g::bigint AS id, g * 0.5 AS x, '
                f"(g % 97)::int AS n, 'event ' || g AS name FROM generate_series(1, {rows}) g"
            )
            admin.execute(f'ANALYZE "{schema}".events')
            sql = f'SELECT id, x, n, name FROM "{schema}".events'
            modes = {"serial": (1, chunk_rows), "ranged_2": (2, chunk_rows), "ranged_4": (4, chunk_rows)}
            modes["one_range"] = (4, rows)  # chunk_rows = all rows: one planned chunk, so one range
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            for _ in range(repeat):
                for mode, (workers, chunk) in modes.items():
                    source = SQLQuerySource(
                        sql, conn_id=CONN_ID, split_column="id", export_parallelism=workers
                    )
                    times[mode].append(
                        round(timed(lambda d, s=source, c=chunk: stage_source(s, d, chunk_rows=c), rows), 3)
                    )
            print(f"PostgreSQL, {rows:,} rows, chunk_rows {chunk_rows:,}, {os.cpu_count()} cores")
            report("sql", times)
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def duckdb_ranges(database: str, sql: str, workers: int, rows: int, run_dir: Path) -> Manifest:
    """A prototype of ranges on DuckDB: ``workers`` cursors, each one range of ``id``, each its own chunks."""
    import duckdb

    from airflow_batch_infer.copy_staging import _ChunkWriter, _write_chunks

    bounds = [1 + rows * j // workers for j in range(workers + 1)]
    chunks = []
    with duckdb.connect(database, read_only=True, config={"enable_external_access": False}) as con:

        def export(j: int) -> None:
            cursor = con.cursor()
            query = f"SELECT * FROM ({sql}) AS q WHERE id >= {bounds[j]} AND id < {bounds[j + 1]}"
            writer = _ChunkWriter(run_dir, "chunks", rows, "row_id", True, True, j, bounds[j] - 1)
            _write_chunks(cursor.sql(query).to_arrow_reader(50_000), writer)
            chunks.extend(writer.chunks)

        threads = [threading.Thread(target=export, args=(j,)) for j in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return Manifest(str(run_dir), "duckdb", "row_id", sum(c.rows for c in chunks), rows, {}, chunks)


def duckdb_export(rows: int, repeat: int) -> None:
    import duckdb

    from airflow_batch_infer.sources import SQLQuerySource

    with tempfile.TemporaryDirectory(prefix="abi-sql-bench-") as folder:
        database = str(Path(folder) / "w.duckdb")
        with duckdb.connect(database) as con:
            con.execute(
                "CREATE TABLE events AS SELECT i::BIGINT AS id, i * 0.5 AS x, (i % 97)::INT AS n, "
                f"'event ' || i AS name FROM range(1, {rows} + 1) t(i)"
            )
        sql = "SELECT id, x, n, name FROM events"
        times: dict[str, list[float]] = {"serial": [], "ranged_2": [], "ranged_4": []}
        for _ in range(repeat):
            source = SQLQuerySource(sql, database=database)
            serial = lambda d, s=source: stage_source(s, d, chunk_rows=rows)  # noqa: E731
            times["serial"].append(round(timed(serial, rows), 3))
            for workers in (2, 4):
                stage = lambda d, w=workers: duckdb_ranges(database, sql, w, rows, d)  # noqa: E731
                times[f"ranged_{workers}"].append(round(timed(stage, rows), 3))
        print(f"DuckDB, {rows:,} rows, {os.cpu_count()} cores")
        report("duckdb", times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each mode, alternating")
    parser.add_argument("--chunk-rows", type=int, default=250_000)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--duckdb", action="store_true", help="time DuckDB (a prototype of ranges) too")
    args = parser.parse_args(argv)
    postgres(args.rows, args.repeat, args.dsn, args.chunk_rows)
    if args.duckdb:
        duckdb_export(args.rows, args.repeat)


if __name__ == "__main__":
    main()
