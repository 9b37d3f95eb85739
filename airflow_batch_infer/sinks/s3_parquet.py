"""S3ParquetSink: a hive-partitioned Parquet dataset on S3 (or local disk), one version per run, switched by
one pointer per partition that covers the outputs and the rejects.

Layout, under ``path``::

    <table>/_common_metadata                                      the schema, written when it is created
    <table>/<partition_column>=<key>/_v<UTC time>-<token>/part-00000.parquet   a version's output parts
    <table>/<partition_column>=<key>/_SUCCESS                     the pointer: the committed version
    <table>_rejects/<partition_column>=<key>/_v<UTC time>-<token>/part-00000.parquet   its rejects parts
    <table>/_locks/<partition_column>=<key>.lock                  held while a run writes the partition

A run, holding the partition's lock (``sinks/locks.py``: a second writer fails at once, naming the first):

1. reads the partition's pointer and what identifies it (its S3 ETag, or a hash of the local file);
2. copies its parts (server side when they are on the same store) into a new version folder of both tables,
   which nobody reads yet: its name starts with ``_``, and the pointer does not name it;
3. commits: replaces the pointer in ONE conditional write (S3 ``If-Match`` on that ETag, ``If-None-Match``
   for the first commit; compare and rename on disk). The pointer is JSON with the fields ``_SUCCESS``
   always had, for the outputs (``rows``, ``files`` relative to the partition folder, ``committed_at``),
   plus ``version`` and ``rejects`` (``table``, ``rows``, ``files``): outputs and rejects switch together;
4. deletes everything else in the two partition folders (earlier versions, versions of failed runs, files
   of the earlier, unversioned layout). A failure there is logged, not raised: the next run deletes them.

A failure before the commit leaves the previous version and pointer as they were (the new folder is
removed, or by the next run). Every attempt writes its own version, so a retry leaves one copy of the rows.

Readers read the pointer, then exactly the files it lists (:func:`read_partition`, :func:`committed_files`;
for the rejects table, pass ``<table>_rejects``: its files are listed in the output table's pointer); other
engines read the files listed (DuckDB ``read_parquet([...], hive_partitioning = true)``). A reader that read
the pointer just before a switch can find those files deleted: :func:`read_partition` reads it again. Plain
hive discovery of the table folder (``spark.read.parquet("<path>/<table>")``, ``pyarrow.dataset``, DuckDB
globs, a Glue crawler) finds NO rows of partitions written this way: a folder listing cannot switch
many files at once, and every version folder is hidden from it (``_``) so that it can never show two
versions, or half of one. To query the dataset with Athena, use the ``athena`` sink, which switches the Glue
partition location instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq

from airflow_batch_infer import storage
from airflow_batch_infer.parquet_files import open_parquet
from airflow_batch_infer.sinks.base import (
    PersistResult,
    SchemaMismatchError,
    WarehouseSink,
    check_fit,
    parts_rows,
)
from airflow_batch_infer.sinks.locks import DEFAULT_LOCK_TIMEOUT, partition_lock
from airflow_batch_infer.sinks.s3_versions import (
    POINTER,
    CommitConflictError,
    VersionFiles,
    committed_files,
    committed_version,
    new_version,
    pointer_body,
    read_partition,
    read_pointer,
    remove_other_entries,
    write_pointer,
)

__all__ = [
    "CommitConflictError",
    "S3ParquetSink",
    "committed_files",
    "committed_version",
    "read_partition",
]

log = logging.getLogger(__name__)

SCHEMA_FILE = "_common_metadata"


class S3ParquetSink(WarehouseSink):
    """Replace a partition of a hive-partitioned Parquet dataset: write a new version, then switch to it.

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

    def pointer_location(self, partition: str) -> str:
        """The partition's pointer: the commit of the outputs and the rejects."""
        return storage.join(self.partition_location(self.table, partition), POINTER)

    def replace_partition(
        self, partition: str, output_parts: Sequence[str | Path], reject_parts: Sequence[str | Path]
    ) -> PersistResult:
        self._check_or_create(self.table, output_parts)
        self._check_or_create(self.rejects_table, reject_parts)
        version = new_version()
        pointer = self.pointer_location(partition)
        # One writer per partition at a time, for the outputs and the rejects together.
        with partition_lock(
            self.table_location(self.table),
            self.partition_column,
            partition,
            timeout=self.lock_timeout,
            description=f"s3_parquet {self.table}",
        ):
            previous, expected = read_pointer(pointer)
            replaced = self._rows_committed(partition, previous)
            try:
                outputs = self._write_version(self.table, partition, output_parts, version)
                rejects = self._write_version(self.rejects_table, partition, reject_parts, version)
                self._switch(
                    pointer,
                    pointer_body(partition, self.partition_column, version, outputs, rejects),
                    expected,
                )
            except BaseException:
                self._discard_unless_committed(partition, version)
                raise
            for table, keep in ((self.table, [POINTER, version]), (self.rejects_table, [version])):
                remove_other_entries(self.partition_location(table, partition), keep)
        return self._result(
            partition,
            outputs.rows,
            rejects.rows,
            replaced,
            storage.plain_url(self.partition_location(self.table, partition)),
        )

    def _check_or_create(self, table: str, parts: Sequence[str | Path]) -> None:
        """Check that the parts fit the dataset; create it (its ``_common_metadata``) if asked."""
        schema = self.incoming_schema(parts)
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

    def _write_version(
        self, table: str, partition: str, parts: Sequence[str | Path], version: str
    ) -> VersionFiles:
        """Copy the parts into the version folder of the table's partition (server side on one store)."""
        folder = self.partition_location(table, partition)
        files = []
        for index, part in enumerate(parts):
            name = f"{version}/part-{index:05d}.parquet"
            storage.copy(part, storage.join(folder, name))
            files.append(name)
        return VersionFiles(table=table, rows=parts_rows(parts), files=tuple(files))

    def _switch(self, pointer: str, body: bytes, expected: str | None) -> None:
        """The commit: replace the pointer in one conditional write (see :func:`write_pointer`)."""
        write_pointer(pointer, body, expected)

    def _discard_unless_committed(self, partition: str, version: str) -> None:
        """After a failure: remove the run's version folders, unless the pointer names them after all (a
        write that reached the store although its answer did not)."""
        try:
            current, _ = read_pointer(self.pointer_location(partition))
            if (current or {}).get("version") == version:
                return
            for table in (self.table, self.rejects_table):
                storage.remove(storage.join(self.partition_location(table, partition), version))
        except Exception:
            log.warning(
                "Could not remove the uncommitted version %s; the next run will.", version, exc_info=True
            )

    def _rows_committed(self, partition: str, pointer: dict | None) -> int:
        """Rows the partition holds now: from its pointer, or the files of the earlier layout."""
        if pointer is not None:
            return int(pointer["rows"])
        folder = self.partition_location(self.table, partition)
        files = [
            f for f in storage.list_files(folder) if f.endswith(".parquet") and "/_" not in f[len(folder) :]
        ]
        return sum(open_parquet(f).metadata.num_rows for f in files)
