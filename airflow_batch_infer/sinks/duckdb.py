"""DuckDBSink: the embedded default warehouse, a DuckDB database file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb

from airflow_batch_infer.paths import batch_infer_home
from airflow_batch_infer.sinks.base import (
    PersistResult,
    SchemaMismatchError,
    WarehouseSink,
    qualified_table,
    quote_identifier,
)


class DuckDBSink(WarehouseSink):
    """Replace a partition of a DuckDB table in one transaction: delete the partition, insert the parts.

    :param table: output table (``table`` or ``schema.table``).
    :param database: the DuckDB file (default ``$BATCH_INFER_HOME/warehouse.duckdb``).
    :param partition_column: column holding the partition key.
    :param create_table: create the tables from the outputs' schema when they do not exist.
    """

    name = "duckdb"

    def __init__(
        self,
        table: str,
        database: str | None = None,
        partition_column: str = "batch_partition",
        create_table: bool = True,
    ) -> None:
        super().__init__(table, partition_column, create_table)
        self.database = str(database or batch_infer_home() / "warehouse.duckdb")

    def replace_partition(
        self, partition: str, output_parts: Sequence[Path], reject_parts: Sequence[Path]
    ) -> PersistResult:
        Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        with duckdb.connect(self.database) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                replaced, rows = self._replace(con, self.table, partition, output_parts)
                _, rejected = self._replace(con, self.rejects_table, partition, reject_parts)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return PersistResult(
            table=self.table,
            rejects_table=self.rejects_table,
            partition=partition,
            rows=rows,
            rejected=rejected,
            replaced=replaced,
            location=self.database,
        )

    def _replace(
        self, con: duckdb.DuckDBPyConnection, table: str, partition: str, parts: Sequence[Path]
    ) -> tuple[int, int]:
        """Delete then insert one table's partition inside the open transaction; (rows before, after)."""
        target = qualified_table(table)
        column = quote_identifier(self.partition_column, "partition column")
        files = {"files": [str(p) for p in parts]}
        incoming = con.execute("DESCRIBE SELECT * FROM read_parquet($files)", files).fetchall()
        incoming_types = {name: dtype for name, dtype, *_ in incoming}
        if self.partition_column in incoming_types:
            raise SchemaMismatchError(
                f"The outputs already have a column {self.partition_column!r}, which is the partition "
                "column: rename that output column or choose another partition_column."
            )
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
            self._check_fit(table, existing, incoming_types)
        before = con.execute(
            f"SELECT count(*) FROM {target} WHERE {column} = $p", {"p": partition}
        ).fetchone()
        con.execute(f"DELETE FROM {target} WHERE {column} = $p", {"p": partition})
        con.execute(
            f"INSERT INTO {target} BY NAME SELECT $p AS {column}, * FROM read_parquet($files)",
            {**files, "p": partition},
        )
        after = con.execute(f"SELECT count(*) FROM {target} WHERE {column} = $p", {"p": partition}).fetchone()
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

    def _check_fit(self, table: str, existing: dict[str, str], incoming: dict[str, str]) -> None:
        if self.partition_column not in existing:
            raise SchemaMismatchError(
                f"Table {table} has no partition column {self.partition_column!r}: it was not created by "
                "this sink. Choose another table, or add the column."
            )
        for name, dtype in incoming.items():
            if name not in existing:
                raise SchemaMismatchError(
                    f"Table {table} has no column {name!r} ({dtype}) that the outputs carry: add it "
                    f"(ALTER TABLE {table} ADD COLUMN {name} {dtype}) or write to a new table."
                )
            if existing[name] != dtype:
                raise SchemaMismatchError(
                    f"Column {name!r} of table {table} is {existing[name]} but the outputs hold {dtype}: "
                    "alter the column or write to a new table."
                )
