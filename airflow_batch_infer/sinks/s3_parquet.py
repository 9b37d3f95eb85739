"""S3ParquetSink: a hive-partitioned Parquet dataset on S3 (or local disk), a success marker per partition.

Layout, under ``path``::

    <table>/_common_metadata                         the dataset's schema, written when it is created
    <table>/<partition_column>=<key>/part-00000.parquet
    <table>/<partition_column>=<key>/_SUCCESS        written last: rows, files, time (JSON)
    <table>_rejects/...                              the same for the rows set aside

Object stores have no transaction and no atomic rename of a folder, so a partition is replaced in steps
that keep the window where readers can see it incomplete as short as possible, and never let a row
appear twice:

1. the new parts are uploaded first, out of sight, under ``<table>/_incoming/<token>/`` (readers of hive
   datasets, Spark, Athena and pyarrow skip names that start with ``_``); parts already on the same store
   (a staging root on S3) need no upload;
2. the partition's ``_SUCCESS`` is deleted, then every file of the partition;
3. the new parts are copied in, server side, under fixed names ``part-NNNNN.parquet``;
4. ``_SUCCESS`` is written, last, listing the files and the row count.

A failure in step 1 leaves the partition as it was. A failure in steps 2-3 leaves a partition without
``_SUCCESS`` that holds a subset of the new rows (never old and new rows together); the retry repeats all
steps and leaves exactly the run's rows. Readers that must never see a partial partition check
``_SUCCESS`` (and may read exactly the files it lists).

Steps 2-4 run under the partition's lock (``<table>/_locks/<column>=<key>.lock``, created with a
conditional write): a second run persisting the same partition at the same time fails at once, naming the
first, instead of interleaving its copies and deletions with it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from airflow_batch_infer import storage
from airflow_batch_infer.parquet_files import open_parquet
from airflow_batch_infer.sinks.base import (
    PersistResult,
    SchemaMismatchError,
    WarehouseSink,
    check_fit,
    check_partition_column_absent,
    parts_rows,
    parts_schema,
)
from airflow_batch_infer.sinks.locks import DEFAULT_LOCK_TIMEOUT, partition_lock

SUCCESS = "_SUCCESS"
SCHEMA_FILE = "_common_metadata"
INCOMING = "_incoming"


class S3ParquetSink(WarehouseSink):
    """Replace a partition of a hive-partitioned Parquet dataset, writing the ``_SUCCESS`` marker last.

    :param table: the dataset's name: its folder under ``path``; rejects go to ``<table>_rejects``.
    :param path: the root of the datasets: ``s3://bucket/prefix`` (or a local folder).
    :param conn_id: Airflow connection (``aws``) for ``path``; a URL may also name it itself.
    :param partition_column: the partition folders' key (``<partition_column>=<key>``).
    :param create_table: start a new dataset (its ``_common_metadata``) when there is none.
    :param lock_timeout: seconds after which a partition's lock (``<table>/_locks/``) is taken to be a dead
        writer's; while it is held, a second writer of the partition fails at once, naming the first.
    """

    name = "s3_parquet"

    def __init__(
        self,
        table: str,
        path: str,
        conn_id: str | None = None,
        partition_column: str = "batch_partition",
        create_table: bool = True,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        super().__init__(table, partition_column, create_table)
        self.root = storage.location(path, conn_id)
        self.lock_timeout = float(lock_timeout)

    def table_location(self, table: str) -> str:
        return storage.join(self.root, table)

    def partition_location(self, table: str, partition: str) -> str:
        return storage.join(self.table_location(table), f"{self.partition_column}={partition}")

    def replace_partition(
        self, partition: str, output_parts: Sequence[str | Path], reject_parts: Sequence[str | Path]
    ) -> PersistResult:
        token = uuid.uuid4().hex[:12]
        outputs = self._prepare(self.table, output_parts, token)
        rejects = self._prepare(self.rejects_table, reject_parts, token)
        # One writer per partition at a time, for the outputs and the rejects together.
        with partition_lock(
            self.table_location(self.table),
            self.partition_column,
            partition,
            timeout=self.lock_timeout,
            description=f"s3_parquet {self.table}",
        ):
            replaced, rows = self._swap(self.table, partition, outputs)
            _, rejected = self._swap(self.rejects_table, partition, rejects)
        for table in (self.table, self.rejects_table):
            storage.remove(storage.join(self.table_location(table), INCOMING, token))
        return self._result(
            partition,
            rows,
            rejected,
            replaced,
            storage.plain_url(self.partition_location(self.table, partition)),
        )

    def _prepare(self, table: str, parts: Sequence[str | Path], token: str) -> list[str]:
        """Check the schema, create the dataset if asked, and bring the parts onto the dataset's store."""
        schema = parts_schema(parts)
        check_partition_column_absent(self.partition_column, schema.names)
        schema_file = storage.join(self.table_location(table), SCHEMA_FILE)
        if storage.exists(schema_file):
            existing = pq.read_schema(storage.open_input(schema_file))
            check_fit(
                table,
                self.partition_column,
                {self.partition_column: "string", **{f.name: str(f.type) for f in existing}},
                {f.name: str(f.type) for f in schema},
            )
        elif not self.create_table:
            raise SchemaMismatchError(
                f"Dataset {table} does not exist at {storage.plain_url(self.table_location(table))} "
                "(no _common_metadata) and create_table is off."
            )
        else:
            tmp = storage.local_temp(schema_file)
            pq.write_metadata(schema, tmp)
            storage.publish(tmp, schema_file)
        target = self.table_location(table)
        if all(storage.same_store(part, target) for part in parts):
            return [str(p) for p in parts]
        incoming = []
        for index, part in enumerate(parts):
            staged = storage.join(target, INCOMING, token, f"part-{index:05d}.parquet")
            storage.copy(part, staged)
            incoming.append(staged)
        return incoming

    def _swap(self, table: str, partition: str, parts: Sequence[str]) -> tuple[int, int]:
        """Replace the partition's files with ``parts``, marker last; (rows before, rows after)."""
        folder = self.partition_location(table, partition)
        marker = storage.join(folder, SUCCESS)
        before = self._rows_in(folder, marker)
        storage.remove(marker)
        storage.remove(folder)
        files = []
        for index, part in enumerate(parts):
            final = storage.join(folder, f"part-{index:05d}.parquet")
            storage.copy(part, final)
            files.append(f"part-{index:05d}.parquet")
        rows = parts_rows(parts)
        storage.write_bytes(
            marker,
            json.dumps(
                {
                    "table": table,
                    "partition": partition,
                    "rows": rows,
                    "files": files,
                    "committed_at": datetime.now(timezone.utc).isoformat(),
                },
                indent=2,
            ).encode(),
        )
        return before, rows

    @staticmethod
    def _rows_in(folder: str, marker: str) -> int:
        if storage.exists(marker):
            return int(json.loads(storage.read_text(marker))["rows"])
        files = [f for f in storage.list_files(folder) if f.endswith(".parquet")]
        return sum(open_parquet(f).metadata.num_rows for f in files)
