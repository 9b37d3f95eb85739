"""AthenaSink: Parquet on S3 under the table's location, the partition registered in the Glue catalog.

Each run writes its parts into a new, versioned folder of the partition,
``<table location>/<partition_column>=<key>/v<UTC time>-<token>/``, then points the partition at it with
Athena DDL (``ALTER TABLE ... ADD IF NOT EXISTS PARTITION ... LOCATION``, then ``... SET LOCATION``). The
location change is one catalog update: queries see the old rows or the new rows, never a mix and never
both. A failure before it leaves the partition as it was (the unfinished folder is never read and is
removed by the next successful run); after it, the folders of earlier versions are deleted.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa

from airflow_batch_infer import storage
from airflow_batch_infer.arrow_types import is_list
from airflow_batch_infer.sinks.base import (
    PersistResult,
    SchemaMismatchError,
    WarehouseSink,
    check_fit,
    parts_rows,
    sql_literal,
    validate_identifier,
)
from airflow_batch_infer.sinks.locks import DEFAULT_LOCK_TIMEOUT, partition_lock

_SCALARS: list[tuple[Any, str]] = [
    (pa.types.is_boolean, "boolean"),
    (lambda t: t == pa.int8(), "tinyint"),
    (lambda t: t in (pa.int16(), pa.uint8()), "smallint"),
    (lambda t: t in (pa.int32(), pa.uint16()), "int"),
    (lambda t: t in (pa.int64(), pa.uint32()), "bigint"),
    (lambda t: t in (pa.float16(), pa.float32()), "float"),
    (lambda t: t == pa.float64(), "double"),
    (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    (pa.types.is_date, "date"),
    (pa.types.is_timestamp, "timestamp"),
]
_FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def hive_type(name: str, arrow_type: pa.DataType) -> str:
    """The Athena (Hive DDL) type of a Parquet column of ``arrow_type``."""
    if pa.types.is_decimal(arrow_type):
        return f"decimal({arrow_type.precision},{arrow_type.scale})"
    if is_list(arrow_type):
        return f"array<{hive_type(name, arrow_type.value_type)}>"
    for test, hive in _SCALARS:
        if test(arrow_type):
            return hive
    raise SchemaMismatchError(f"Column {name!r} holds {arrow_type}, which the athena sink cannot declare.")


class AthenaSink(WarehouseSink):
    """Replace a partition of an Athena table (Glue catalog, Parquet on S3) by switching its location.

    :param table: the table (``table`` or ``database.table``); rejects go to ``<table>_rejects``.
    :param database: the Glue/Athena database (when ``table`` does not name it).
    :param location: where new tables keep their data: ``s3://bucket/prefix`` (the table's folder is
        ``<location>/<table>/``); an existing table's own location is used otherwise.
    :param aws_conn_id: Airflow ``aws`` connection for S3, Glue and Athena.
    :param output_location: ``s3://`` folder for Athena's query results (unless the workgroup sets one).
    :param workgroup: the Athena workgroup.
    :param partition_column: the partition key column (a ``string`` partition key of the table).
    :param create_table: create the table (``CREATE EXTERNAL TABLE``) when the catalog has none.
    :param query_timeout: seconds to wait for each DDL statement before failing (never unbounded).
    :param poll_interval: seconds between status checks of a statement.
    :param lock_timeout: seconds after which a partition's lock (``<table location>/_locks/``) is taken to
        be a dead writer's; while it is held, a second writer of the partition fails at once.
    """

    name = "athena"

    def __init__(
        self,
        table: str,
        database: str | None = None,
        location: str | None = None,
        aws_conn_id: str | None = "aws_default",
        output_location: str | None = None,
        workgroup: str = "primary",
        partition_column: str = "batch_partition",
        create_table: bool = True,
        query_timeout: float = 300.0,
        poll_interval: float = 1.0,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        named_database, _, name = table.rpartition(".")
        super().__init__(name, partition_column, create_table)
        self.database = validate_identifier(named_database or database or "", "database")
        if location:
            ddl_literal(location, "location")  # refused before any part is uploaded
        self.location = location
        self.aws_conn_id = aws_conn_id
        self.output_location = output_location
        self.workgroup = workgroup
        self.query_timeout = float(query_timeout)
        self.poll_interval = float(poll_interval)
        self.lock_timeout = float(lock_timeout)

    @cached_property
    def athena_hook(self) -> Any:
        from airflow.providers.amazon.aws.hooks.athena import AthenaHook

        return AthenaHook(aws_conn_id=self.aws_conn_id, log_query=False)

    @cached_property
    def glue_client(self) -> Any:
        from airflow.providers.amazon.aws.hooks.glue_catalog import GlueCatalogHook

        return GlueCatalogHook(aws_conn_id=self.aws_conn_id).get_conn()

    def _ddl_name(self, table: str) -> str:
        return f"`{self.database}`.`{validate_identifier(table, 'table')}`"

    def replace_partition(
        self, partition: str, output_parts: Sequence[str | Path], reject_parts: Sequence[str | Path]
    ) -> PersistResult:
        version = f"v{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        with partition_lock(
            self._lock_root(),
            self.partition_column,
            partition,
            timeout=self.lock_timeout,
            description=f"athena {self.database}.{self.table}",
        ):
            replaced = self._rows_registered(self.table, partition)
            outputs = self._write(self.table, partition, output_parts, version)
            rejects = self._write(self.rejects_table, partition, reject_parts, version)
            for table, folder in ((self.table, outputs), (self.rejects_table, rejects)):
                self._point_partition(table, partition, folder)
            for folder in (outputs, rejects):
                self._remove_other_versions(folder)
        return PersistResult(
            table=f"{self.database}.{self.table}",
            rejects_table=f"{self.database}.{self.rejects_table}",
            partition=partition,
            rows=parts_rows(output_parts),
            rejected=parts_rows(reject_parts),
            replaced=replaced,
            location=storage.plain_url(outputs),
        )

    def _lock_root(self) -> str:
        """The table's folder, where its partitions' locks live (``_locks/``, which Athena does not read)."""
        existing = self._existing(self.table)
        if existing is not None:
            return storage.location(existing[1].rstrip("/"), self.aws_conn_id)
        if not self.location:
            raise ValueError("location= (s3://bucket/prefix) is needed to create an Athena table.")
        return storage.join(storage.location(self.location, self.aws_conn_id), self.table)

    def _write(self, table: str, partition: str, parts: Sequence[str | Path], version: str) -> str:
        """Check or create the table, then copy the parts into a new version folder; return the folder."""
        schema = self.incoming_schema(parts)
        incoming = {f.name.lower(): hive_type(f.name, f.type) for f in schema}
        existing = self._existing(table)
        if existing is None:
            if not self.create_table:
                raise SchemaMismatchError(
                    f"Table {self.database}.{table} is not in the Glue catalog and create_table is off."
                )
            if not self.location:
                raise ValueError("location= (s3://bucket/prefix) is needed to create an Athena table.")
            table_location = storage.join(storage.location(self.location, self.aws_conn_id), table)
            self._create(table, schema, storage.plain_url(table_location) + "/")
        else:
            columns, table_url = existing
            check_fit(f"{self.database}.{table}", self.partition_column, columns, incoming)
            table_location = storage.location(table_url.rstrip("/"), self.aws_conn_id)
        folder = storage.join(table_location, f"{self.partition_column}={partition}", version)
        for index, part in enumerate(parts):
            storage.copy(part, storage.join(folder, f"part-{index:05d}.parquet"))
        return folder

    def _existing(self, table: str) -> tuple[dict[str, str], str] | None:
        """The table's columns and partition keys → types, and its location; ``None`` if not catalogued."""
        glue = self.glue_client
        try:
            found = glue.get_table(DatabaseName=self.database, Name=table)["Table"]
        except glue.exceptions.EntityNotFoundException:
            return None
        descriptor = found.get("StorageDescriptor", {})
        columns = {c["Name"].lower(): c["Type"].lower() for c in descriptor.get("Columns", [])}
        columns.update({c["Name"].lower(): c["Type"].lower() for c in found.get("PartitionKeys", [])})
        return columns, descriptor.get("Location", "")

    def _rows_registered(self, table: str, partition: str) -> int:
        """Rows under the partition's current location (0 when it is not registered yet)."""
        glue = self.glue_client
        try:
            found = glue.get_partition(
                DatabaseName=self.database, TableName=table, PartitionValues=[partition]
            )
        except glue.exceptions.EntityNotFoundException:
            return 0
        found = found["Partition"]
        url = found.get("StorageDescriptor", {}).get("Location", "")
        if not url:
            return 0
        files = storage.list_files(storage.location(url.rstrip("/"), self.aws_conn_id))
        return parts_rows([f for f in files if f.endswith(".parquet")])

    def _create(self, table: str, schema: pa.Schema, url: str) -> None:
        columns = ", ".join(
            f"`{validate_identifier(f.name, 'column').lower()}` {hive_type(f.name, f.type)}" for f in schema
        )
        self.run(
            f"CREATE EXTERNAL TABLE IF NOT EXISTS {self._ddl_name(table)} ({columns}) "
            f"PARTITIONED BY (`{self.partition_column.lower()}` string) STORED AS PARQUET "
            f"LOCATION {ddl_literal(url, 'location')}"
        )

    def _point_partition(self, table: str, partition: str, folder: str) -> None:
        spec = f"(`{self.partition_column.lower()}` = {ddl_literal(partition, 'partition')})"
        url = ddl_literal(storage.plain_url(folder) + "/", "location")
        self.run(f"ALTER TABLE {self._ddl_name(table)} ADD IF NOT EXISTS PARTITION {spec} LOCATION {url}")
        self.run(f"ALTER TABLE {self._ddl_name(table)} PARTITION {spec} SET LOCATION {url}")

    @staticmethod
    def _remove_other_versions(folder: str) -> None:
        current = folder.rstrip("/") + "/"
        parent = folder.rstrip("/").rsplit("/", 1)[0]
        for path in storage.list_files(parent):
            if not path.startswith(current):
                storage.remove(path)

    def run(self, query: str) -> str:
        """Run one statement on Athena and wait for it, at most ``query_timeout`` seconds."""
        hook = self.athena_hook
        result = {"OutputLocation": self.output_location} if self.output_location else {}
        query_id = hook.run_query(query, {"Database": self.database}, result, workgroup=self.workgroup)
        deadline = time.monotonic() + self.query_timeout
        while True:
            state = hook.check_query_status(query_id)
            if state in _FINAL:
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Athena query {query_id} still {state} after {self.query_timeout:.0f} s: {query}"
                )
            time.sleep(self.poll_interval)
        if state != "SUCCEEDED":
            reason = hook.get_state_change_reason(query_id)
            raise RuntimeError(f"Athena query {query_id} {state}: {reason}. Query: {query}")
        return query_id


def ddl_literal(value: str, what: str = "value") -> str:
    """``value`` as a string literal of Athena DDL, which Hive parses: a quote cannot be escaped by doubling
    (``'a''b'`` reads as ``'a' 'b'``, that is ``ab``), so a single quote is refused, as are backslashes and
    control characters (:func:`~airflow_batch_infer.sinks.base.sql_literal`).

    :param value: the text (a partition key, an S3 location).
    :param what: what it is, for the error message.
    """
    if isinstance(value, str) and "'" in value:
        raise ValueError(
            f"Invalid {what} {value!r}: Athena DDL cannot hold a single quote in a string; rename the "
            "location (or partition key) without one."
        )
    return sql_literal(value, what)
