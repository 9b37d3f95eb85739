"""IcebergSink: an Apache Iceberg table, a partition replaced by one snapshot (pyiceberg).

Each table (the outputs, ``<table>_rejects``) is identity-partitioned on the partition column. A replace
writes the run's rows as new data files, then commits one ``overwrite`` snapshot that removes the
partition's data files and adds the new ones: readers of the table (any engine that reads Iceberg) see the
old partition until the catalog points at the new metadata, and the new one after; never a part of it,
never old and new rows together. The data files are written before the commit, out of sight (no snapshot
lists them); a commit that fails deletes them again.

Concurrency is optimistic, as Iceberg's is. A commit that finds the table changed since it started is
retried by pyiceberg against the new state (``commit.retry.num-retries``, 4 by default) after checking
that nothing was added to or removed from *this* partition meanwhile: runs that replace different
partitions of one table at once all succeed. When another writer did replace the same partition in the
meantime, the second writer fails with :class:`PartitionConflictError` and commits nothing (last writer
does not silently win); the partition then holds the first writer's rows, once, and a retry of the failed
task replaces them with its own.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from airflow_batch_infer.parquet_files import open_parquet
from airflow_batch_infer.sinks import iceberg_catalog
from airflow_batch_infer.sinks.base import (
    PersistResult,
    SchemaMismatchError,
    WarehouseSink,
    split_table,
    validate_identifier,
)

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table, Transaction

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "default"
#: Parts are gathered up to about this many bytes of Arrow data before they are written as data files.
WRITE_BATCH_BYTES = 128 * 1024 * 1024
#: Snapshot summary property that records the partition a snapshot replaced.
PARTITION_PROPERTY = "batch-infer.partition"


class PartitionConflictError(RuntimeError):
    """Another writer replaced the same partition while this one was committing; nothing was committed."""


@dataclass
class _Replace:
    """One table's replace, prepared: its transaction, the files to drop and the data files written."""

    table: Table
    transaction: Transaction
    dropped: list[DataFile] = field(default_factory=list)
    written: list[DataFile] = field(default_factory=list)
    replaced: int = 0
    rows: int = 0
    evolved: bool = False


class IcebergSink(WarehouseSink):
    """Replace a partition of an Iceberg table (and of its rejects table) with one snapshot each.

    :param table: ``table`` or ``namespace.table`` (namespace ``default`` when none is given).
    :param warehouse: where new tables' files go. For the embedded catalog, a local folder that also holds
        its SQLite file (default ``$BATCH_INFER_HOME/iceberg``); for another catalog, its ``warehouse``.
    :param catalog_conn_id: an Airflow connection whose extra holds pyiceberg catalog properties
        (``{"type": "glue"}``, ``{"type": "rest", "uri": ...}``, ``{"type": "sql", "uri": ...}``); the
        embedded SQL catalog when ``None``.
    :param aws_conn_id: an ``aws`` connection whose credentials and region go to a Glue catalog and S3.
    :param catalog: further pyiceberg catalog properties, over the connection's.
    :param catalog_name: the catalog's name (a SQL catalog keeps its tables under it).
    :param partition_column: column holding the partition key; the tables are identity-partitioned on it.
    :param create_table: create missing tables (and their namespace) from the outputs' schema.
    :param allow_schema_evolution: add output columns the table lacks (``union_by_name``, in the same
        commit as the data) instead of refusing them.
    """

    name = "iceberg"

    def __init__(
        self,
        table: str,
        warehouse: str | None = None,
        catalog_conn_id: str | None = None,
        aws_conn_id: str | None = None,
        catalog: Mapping[str, Any] | None = None,
        catalog_name: str = "default",
        partition_column: str = "batch_partition",
        create_table: bool = True,
        allow_schema_evolution: bool = False,
    ) -> None:
        super().__init__(table, partition_column, create_table)
        namespace, _ = split_table(table)
        self.namespace = namespace or DEFAULT_NAMESPACE
        self.catalog_name = validate_identifier(catalog_name, "catalog")
        self.allow_schema_evolution = bool(allow_schema_evolution)
        self.properties = iceberg_catalog.catalog_properties(
            warehouse=warehouse, catalog_conn_id=catalog_conn_id, aws_conn_id=aws_conn_id, catalog=catalog
        )

    def identifier(self, table: str) -> tuple[str, str]:
        """The catalog identifier ``(namespace, name)`` of ``table`` or ``namespace.table``."""
        return self.namespace, split_table(table)[1]

    def catalog(self) -> Catalog:
        return iceberg_catalog.load(self.catalog_name, self.properties)

    def replace_partition(
        self, partition: str, output_parts: Sequence[str | Path], reject_parts: Sequence[str | Path]
    ) -> PersistResult:
        catalog = self.catalog()
        outputs = self._prepare(catalog, self.table, partition, output_parts)
        try:
            rejects = self._prepare(catalog, self.rejects_table, partition, reject_parts)
        except BaseException:
            self._discard(outputs)
            raise
        # Both tables' files are written: the two commits follow each other closely.
        try:
            self._commit(self.table, partition, outputs)
        except BaseException:
            self._discard(rejects)
            raise
        self._commit(self.rejects_table, partition, rejects)
        return self._result(
            partition,
            outputs.rows,
            rejects.rows,
            outputs.replaced,
            f"{outputs.table.location()} ({iceberg_catalog.describe(self.properties)})",
        )

    def _prepare(self, catalog: Catalog, name: str, partition: str, parts: Sequence[str | Path]) -> _Replace:
        """Check (or create, or evolve) the table, find the partition's files and write the new ones."""
        from pyiceberg.expressions import EqualTo

        schema = self.incoming_schema(parts)
        schema = pa.schema([pa.field(self.partition_column, pa.string()), *schema])
        table = self._table(catalog, name, schema)
        replace = _Replace(table, table.transaction())
        replace.evolved = self._fit(name, table, schema, replace.transaction)
        known = True  # rows before, from the manifests: no scan of the data
        for task in table.scan(row_filter=EqualTo(self.partition_column, partition)).plan_files():
            self._check_whole_partition(name, table, task.file, partition)
            replace.dropped.append(task.file)
            replace.replaced += task.file.record_count
            known = known and not task.delete_files  # row deletes another engine wrote: count unknown
        replace.replaced = replace.replaced if known else -1
        try:
            self._write(replace, partition, parts, schema)
        except BaseException:
            self._discard(replace)
            raise
        return replace

    def _table(self, catalog: Catalog, name: str, schema: pa.Schema) -> Table:
        from pyiceberg.exceptions import NoSuchTableError

        identifier = self.identifier(name)
        try:
            return catalog.load_table(identifier)
        except NoSuchTableError:
            if not self.create_table:
                raise SchemaMismatchError(
                    f"Iceberg table {'.'.join(identifier)} does not exist in the "
                    f"{iceberg_catalog.describe(self.properties)} and create_table is off."
                ) from None
        catalog.create_namespace_if_not_exists(self.namespace)
        fresh = _iceberg_schema(schema)
        return catalog.create_table_if_not_exists(identifier, schema=fresh, partition_spec=self._spec(fresh))

    def _spec(self, schema: Any) -> Any:
        from pyiceberg.partitioning import PartitionField, PartitionSpec
        from pyiceberg.transforms import IdentityTransform

        source = schema.find_field(self.partition_column).field_id
        return PartitionSpec(
            PartitionField(
                source_id=source, field_id=1000, transform=IdentityTransform(), name=self.partition_column
            )
        )

    def _fit(self, name: str, table: Table, schema: pa.Schema, transaction: Transaction) -> bool:
        """Refuse outputs the table cannot take, naming the column; add new columns where allowed.

        Returns whether columns were added (in ``transaction``, committed with the data).
        """
        from pyiceberg.transforms import IdentityTransform

        existing = table.schema()
        column = next((f for f in existing.fields if f.name == self.partition_column), None)
        if column is None or not any(
            f.source_id == column.field_id and isinstance(f.transform, IdentityTransform)
            for f in table.spec().fields
        ):
            raise SchemaMismatchError(
                f"Iceberg table {name} is not partitioned by identity({self.partition_column}) (its spec: "
                f"{table.spec()}): it was not created by this sink. Choose another table or partition_column."
            )
        names = {f.name for f in existing.fields}
        new = [f for f in schema if f.name not in names]
        if new and not self.allow_schema_evolution:
            described = ", ".join(f"{f.name!r} ({f.type})" for f in new)
            raise SchemaMismatchError(
                f"Iceberg table {name} has no column {described} that the outputs carry: pass "
                "allow_schema_evolution=True in sink_options to add it, or write to a new table."
            )
        self._check_types(name, existing, pa.schema([f for f in schema if f.name in names]))
        if new:
            log.info("Adding columns %s to Iceberg table %s", [f.name for f in new], name)
            with transaction.update_schema() as update:
                update.union_by_name(pa.schema(new))
        return bool(new)

    @staticmethod
    def _check_types(name: str, existing: Any, schema: pa.Schema) -> None:
        from pyiceberg.exceptions import ResolveError
        from pyiceberg.io.pyarrow import _check_pyarrow_schema_compatible, pyarrow_to_schema
        from pyiceberg.schema import promote
        from pyiceberg.types import PrimitiveType

        provided = pyarrow_to_schema(schema, name_mapping=existing.name_mapping)
        for have in existing.fields:
            want = next((f for f in provided.fields if f.field_id == have.field_id), None)
            if want is None or have.field_type == want.field_type:
                continue
            if isinstance(have.field_type, PrimitiveType) and isinstance(want.field_type, PrimitiveType):
                try:
                    promote(want.field_type, have.field_type)
                    continue
                except ResolveError:
                    pass
            raise SchemaMismatchError(
                f"Column {have.name!r} of Iceberg table {name} is {have.field_type} but the outputs hold "
                f"{want.field_type}: evolve the column or write to a new table."
            )
        try:
            _check_pyarrow_schema_compatible(existing, schema)  # nested fields and required columns
        except ValueError as err:
            raise SchemaMismatchError(f"The outputs do not fit Iceberg table {name}: {err}") from err

    def _check_whole_partition(self, name: str, table: Table, data_file: DataFile, partition: str) -> None:
        """Refuse a data file that may hold rows of other partitions too: dropping it would lose them."""
        from pyiceberg.transforms import IdentityTransform

        spec = table.specs()[data_file.spec_id]
        column = table.schema().find_field(self.partition_column).field_id
        for position, spec_field in enumerate(spec.fields):
            identity = spec_field.source_id == column and isinstance(spec_field.transform, IdentityTransform)
            if identity and data_file.partition[position] == partition:
                return
        raise SchemaMismatchError(
            f"Iceberg table {name} has a data file written under partition spec {spec.spec_id}, not "
            f"identity({self.partition_column}) ({data_file.file_path}): it may hold other partitions' "
            "rows, so this sink cannot replace the partition by dropping files. Rewrite the table's files "
            "under its current spec first."
        )

    def _write(
        self, replace: _Replace, partition: str, parts: Sequence[str | Path], schema: pa.Schema
    ) -> None:
        """Write the parts' rows, with the partition column, as data files (memory: about one batch)."""
        from pyiceberg.io.pyarrow import _dataframe_to_data_files

        metadata = replace.transaction.table_metadata  # with the columns added in this transaction
        write_uuid, counter = uuid.uuid4(), itertools.count()
        pending: list[pa.Table] = []

        def flush() -> None:
            if pending:
                data = pa.concat_tables(pending)
                pending.clear()
                replace.written.extend(
                    _dataframe_to_data_files(
                        table_metadata=metadata,
                        df=data,
                        io=replace.table.io,
                        write_uuid=write_uuid,
                        counter=counter,
                    )
                )

        for part in parts:
            rows = open_parquet(part).read()
            if rows.num_rows == 0:
                continue
            values = pa.array([partition] * rows.num_rows, pa.string())
            pending.append(rows.add_column(0, schema.field(0), values).cast(schema))
            replace.rows += rows.num_rows
            if sum(t.nbytes for t in pending) >= WRITE_BATCH_BYTES:
                flush()
        flush()

    def _commit(self, name: str, partition: str, replace: _Replace) -> None:
        """Commit one snapshot that drops the partition's old files and adds the new ones."""
        from pyiceberg.exceptions import CommitFailedException, ValidationException
        from pyiceberg.expressions import EqualTo

        if not replace.dropped and not replace.written and not replace.evolved:
            return  # nothing before, nothing now: no snapshot
        transaction = replace.transaction
        snapshot = transaction.update_snapshot(snapshot_properties={PARTITION_PROPERTY: partition})
        try:
            with snapshot.overwrite() as overwrite:
                # The predicate scopes pyiceberg's conflict checks to this partition when a commit is retried.
                overwrite.delete_by_predicate(EqualTo(self.partition_column, partition))
                for data_file in replace.dropped:
                    overwrite.delete_data_file(data_file)
                for data_file in replace.written:
                    overwrite.append_data_file(data_file)
            transaction.commit_transaction()
        except ValidationException as err:
            self._discard(replace)
            raise PartitionConflictError(
                f"Partition {self.partition_column}={partition} of Iceberg table {name} was written by "
                f"another writer while this run committed it ({err}). Nothing of this run was committed; the "
                "partition holds the other writer's rows. Run the task again to replace them with this run's."
            ) from err
        except CommitFailedException as err:
            self._discard(replace)
            raise PartitionConflictError(
                f"Iceberg table {name} kept changing while this run committed partition {partition} ({err}); "
                "nothing of this run was committed. Run the task again."
            ) from err

    @staticmethod
    def _discard(replace: _Replace) -> None:
        """Delete the data files a replace wrote and will never commit."""
        for data_file in replace.written:
            try:
                replace.table.io.delete(data_file.file_path)
            except Exception:  # best effort: a file no snapshot lists is harmless
                log.warning(
                    "Could not delete the uncommitted data file %s", data_file.file_path, exc_info=True
                )
        replace.written.clear()


def _iceberg_schema(schema: pa.Schema) -> Any:
    """The Iceberg schema of an Arrow schema without field ids (fresh ids, every column optional)."""
    from pyiceberg.io.pyarrow import _ConvertToIcebergWithoutIDs, visit_pyarrow
    from pyiceberg.schema import assign_fresh_schema_ids

    return assign_fresh_schema_ids(visit_pyarrow(schema, _ConvertToIcebergWithoutIDs()))
