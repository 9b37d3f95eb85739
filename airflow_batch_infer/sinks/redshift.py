"""RedshiftSink: replace a partition of a Redshift table in one transaction, COPYing the Parquet parts.

The parts must be on S3 for ``COPY``: with a staging root on S3 they already are; otherwise they are
uploaded under ``s3_prefix`` first. A COPY manifest lists exactly the run's parts, so nothing else under
the prefix is ever loaded. The statements go through the Redshift Data API's ``BatchExecuteStatement``,
which runs them as one transaction::

    CREATE TABLE IF NOT EXISTS t (...)          -- when the table is new and create_table is on
    LOCK t                                      -- one replacement of the table at a time
    CREATE TEMP TABLE stage (...)               -- the outputs' columns
    COPY stage FROM 's3://.../outputs.manifest' IAM_ROLE '...' FORMAT AS PARQUET MANIFEST
    DELETE FROM t WHERE batch_partition = 'key'
    INSERT INTO t (batch_partition, ...) SELECT 'key', ... FROM stage
    (the same for t_rejects)

so readers see the old partition until the commit and the new one after; a failure anywhere rolls all of
it back.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
import uuid
from collections.abc import Sequence
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
    qualified_table,
    quote_identifier,
    split_table,
    sql_literal,
)

_IAM_ROLE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$")
_SCALARS: list[tuple[Any, str]] = [
    (pa.types.is_boolean, "BOOLEAN"),
    (lambda t: t in (pa.int8(), pa.int16(), pa.uint8()), "SMALLINT"),
    (lambda t: t in (pa.int32(), pa.uint16()), "INTEGER"),
    (lambda t: t in (pa.int64(), pa.uint32()), "BIGINT"),
    (lambda t: t in (pa.float16(), pa.float32()), "REAL"),
    (lambda t: t == pa.float64(), "DOUBLE PRECISION"),
    (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "VARCHAR(65535)"),
    (pa.types.is_date, "DATE"),
    (lambda t: pa.types.is_timestamp(t) and t.tz is None, "TIMESTAMP"),
    (lambda t: pa.types.is_timestamp(t) and t.tz is not None, "TIMESTAMPTZ"),
]
# Type names as Redshift reports them (DescribeTable), by what this sink declares.
_CANONICAL = {
    "smallint": "int2",
    "integer": "int4",
    "int": "int4",
    "bigint": "int8",
    "real": "float4",
    "double precision": "float8",
    "float": "float8",
    "boolean": "bool",
    "character varying": "varchar",
    "text": "varchar",
    "decimal": "numeric",
    "timestamp without time zone": "timestamp",
    "timestamp with time zone": "timestamptz",
}
_WIDER = {
    "int2": {"int4", "int8", "numeric"},
    "int4": {"int8", "numeric"},
    "int8": {"numeric"},
    "float4": {"float8"},
}
_STATES_FAILED = {"FAILED", "ABORTED"}


def redshift_type(name: str, arrow_type: pa.DataType) -> str:
    """The Redshift type of a Parquet column of ``arrow_type`` (lists become ``SUPER``)."""
    if pa.types.is_decimal(arrow_type):
        return f"DECIMAL({arrow_type.precision},{arrow_type.scale})"
    if is_list(arrow_type):
        return "SUPER"
    for test, declared in _SCALARS:
        if test(arrow_type):
            return declared
    raise SchemaMismatchError(f"Column {name!r} holds {arrow_type}, which the redshift sink cannot store.")


def canonical(type_name: str) -> str:
    """``VARCHAR(65535)`` → ``varchar``, ``DOUBLE PRECISION`` → ``float8``: as DescribeTable names them."""
    base = type_name.lower().split("(")[0].strip()
    return _CANONICAL.get(base, base)


class RedshiftSink(WarehouseSink):
    """Replace a partition of a Redshift table: one Data API batch (one transaction) of DELETE + COPY.

    :param table: output table (``table`` or ``schema.table``); rejects go to ``<table>_rejects``.
    :param database: the Redshift database.
    :param iam_role: ARN of the IAM role Redshift assumes to read the parts from S3.
    :param cluster_identifier: a provisioned cluster (or give ``workgroup_name``).
    :param workgroup_name: a Redshift Serverless workgroup.
    :param db_user: database user (temporary credentials), or give ``secret_arn``.
    :param secret_arn: Secrets Manager secret with the database credentials.
    :param aws_conn_id: Airflow ``aws`` connection for the Data API and S3.
    :param s3_prefix: where local parts are uploaded for COPY (``s3://bucket/prefix``); not needed when
        the staging root is on S3.
    :param partition_column: column holding the partition key.
    :param create_table: create the tables when they do not exist.
    :param wait_for_completion: must stay ``True``: a persist that returned before Redshift committed would
        report the partition written while a failed ``COPY`` could still roll it back. For a long load,
        raise ``wait_timeout``, or call :meth:`submit` and :meth:`wait` from a deferrable operator.
    :param wait_timeout: seconds to wait before failing; the statement itself then goes on in Redshift,
        and commits or rolls back as a whole.
    :param poll_interval: seconds between status checks.
    """

    name = "redshift"

    def __init__(
        self,
        table: str,
        database: str,
        iam_role: str,
        cluster_identifier: str | None = None,
        workgroup_name: str | None = None,
        db_user: str | None = None,
        secret_arn: str | None = None,
        aws_conn_id: str | None = "aws_default",
        s3_prefix: str | None = None,
        partition_column: str = "batch_partition",
        create_table: bool = True,
        wait_for_completion: bool = True,
        wait_timeout: float = 1800.0,
        poll_interval: float = 5.0,
    ) -> None:
        super().__init__(table, partition_column, create_table)
        if not _IAM_ROLE.fullmatch(str(iam_role)):
            raise ValueError(
                f"iam_role {iam_role!r} is not an IAM role ARN (arn:aws:iam::123456789012:role/name)."
            )
        if (cluster_identifier is None) == (workgroup_name is None):
            raise ValueError("Give exactly one of cluster_identifier and workgroup_name.")
        self.database = database
        self.iam_role = iam_role
        self.cluster_identifier = cluster_identifier
        self.workgroup_name = workgroup_name
        self.db_user = db_user
        self.secret_arn = secret_arn
        self.aws_conn_id = aws_conn_id
        self.s3_prefix = storage.location(s3_prefix, aws_conn_id) if s3_prefix else None
        if not wait_for_completion:
            raise ValueError(
                "wait_for_completion=False is not supported: the persist task would report the partition "
                "written before Redshift commits it (a failed COPY rolls the batch back unseen). Raise "
                "wait_timeout for long loads, or call submit() and wait() from a deferrable operator."
            )
        self.wait_for_completion = True
        self.wait_timeout = float(wait_timeout)
        self.poll_interval = float(poll_interval)

    def get_hook(self) -> Any:
        from airflow.providers.amazon.aws.hooks.redshift_data import RedshiftDataHook

        return RedshiftDataHook(aws_conn_id=self.aws_conn_id)

    def _target(self) -> dict[str, Any]:
        return {
            key: value
            for key, value in {
                "ClusterIdentifier": self.cluster_identifier,
                "WorkgroupName": self.workgroup_name,
                "Database": self.database,
                "DbUser": self.db_user,
                "SecretArn": self.secret_arn,
            }.items()
            if value is not None
        }

    def submit(
        self, partition: str, output_parts: Sequence[str | Path], reject_parts: Sequence[str | Path]
    ) -> str:
        """Upload what COPY needs and submit the whole replacement as one Data API batch; return its id.

        The batch is one transaction; nothing is committed until :meth:`wait` sees it ``FINISHED``.
        """
        hook = self.get_hook()
        token = uuid.uuid4().hex[:12]
        statements: list[str] = []
        for index, (table, parts) in enumerate(
            ((self.table, output_parts), (self.rejects_table, reject_parts))
        ):
            manifest = self._manifest(table, partition, parts, token)
            statements += self._statements(
                hook, table, partition, parts, manifest, f"batch_infer_stage_{index}"
            )
        output = hook.execute_query(
            sql=statements,
            database=self.database,
            cluster_identifier=self.cluster_identifier,
            workgroup_name=self.workgroup_name,
            db_user=self.db_user,
            secret_arn=self.secret_arn,
            statement_name=f"batch-infer {self.table} {partition}"[:500],
            wait_for_completion=False,
        )
        return output.statement_id

    def replace_partition(
        self, partition: str, output_parts: Sequence[str | Path], reject_parts: Sequence[str | Path]
    ) -> PersistResult:
        statement_id = self.submit(partition, output_parts, reject_parts)
        rows, rejected = parts_rows(output_parts), parts_rows(reject_parts)
        replaced = -1
        described = self.wait(self.get_hook(), statement_id)  # success only once Redshift committed
        counts = self._counts(described)
        if counts:
            replaced, rows, rejected = counts
        where = self.cluster_identifier or f"workgroup {self.workgroup_name}"
        return self._result(
            partition, rows, rejected, replaced, f"redshift {where}/{self.database}, statement {statement_id}"
        )

    def _manifest(self, table: str, partition: str, parts: Sequence[str | Path], token: str) -> str:
        """Put the parts on S3 (if they are not) and write the COPY manifest that lists exactly them."""
        if not all(storage.is_remote(p) for p in parts):
            if self.s3_prefix is None:
                raise ValueError(
                    "The run's parts are on local disk: give s3_prefix= (s3://bucket/prefix) to upload them "
                    "for COPY, or stage on S3 (staging_root='s3://...')."
                )
            folder = storage.join(self.s3_prefix, table, partition, token)
            uploaded = []
            for index, part in enumerate(parts):
                target = storage.join(folder, f"part-{index:05d}.parquet")
                storage.copy(part, target)
                uploaded.append(target)
            parts = uploaded
        else:
            folder = posixpath.dirname(str(parts[0]))
            not_s3 = [str(p) for p in parts if not storage.plain_url(p).startswith("s3://")]
            if not_s3:
                raise ValueError(f"COPY reads from S3 only; these parts are elsewhere: {not_s3[:3]}")
        entries = [
            {"url": storage.plain_url(p), "mandatory": True, "meta": {"content_length": storage.size(p)}}
            for p in parts
        ]
        manifest = storage.join(folder, f"_redshift-{table}-{token}.manifest")
        storage.write_bytes(manifest, json.dumps({"entries": entries}, indent=1).encode())
        return storage.plain_url(manifest)

    def _statements(
        self, hook: Any, table: str, partition: str, parts: Sequence[str | Path], manifest: str, stage: str
    ) -> list[str]:
        schema = self.incoming_schema(parts)
        folded: dict[str, str] = {}
        for name in [self.partition_column, *schema.names]:
            if name.lower() in folded:
                raise SchemaMismatchError(
                    f"Columns {folded[name.lower()]!r} and {name!r} are one column in Redshift, which folds "
                    "names to lower case: rename one of them."
                )
            folded[name.lower()] = name
        incoming = {f.name: redshift_type(f.name, f.type) for f in schema}
        target = qualified_table(table)
        column = quote_identifier(self.partition_column, "partition column")
        names = [quote_identifier(n, "column") for n in schema.names]
        declared = ", ".join(f"{n} {incoming[f.name]}" for n, f in zip(names, schema, strict=True))
        statements = []
        existing = self._existing_columns(hook, table)
        if existing is None:
            if not self.create_table:
                raise SchemaMismatchError(f"Table {table} does not exist and create_table is off.")
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {target} ({column} VARCHAR(128) NOT NULL, {declared})"
            )
        else:
            # Redshift folds identifiers to lower case, quoted or not: compare names as it stores them.
            check_fit(
                table,
                self.partition_column.lower(),
                {name.lower(): t for name, t in existing.items()},
                {name.lower(): canonical(t) for name, t in incoming.items()},
                fits=lambda have, want: have == want or have in _WIDER.get(want, set()),
            )
        key = sql_literal(partition, "partition")
        serialize = " SERIALIZETOJSON" if "SUPER" in incoming.values() else ""
        statements += [
            f"LOCK {target}",
            f"CREATE TEMP TABLE {quote_identifier(stage)} ({declared})",
            f"COPY {quote_identifier(stage)} FROM {sql_literal(manifest, 'manifest')} "
            f"IAM_ROLE {sql_literal(self.iam_role, 'iam_role')} FORMAT AS PARQUET{serialize} MANIFEST",
            f"DELETE FROM {target} WHERE {column} = {key}",
            f"INSERT INTO {target} ({column}, {', '.join(names)}) "
            f"SELECT {key}, {', '.join(names)} FROM {quote_identifier(stage)}",
            f"DROP TABLE {quote_identifier(stage)}",
        ]
        return statements

    def _existing_columns(self, hook: Any, table: str) -> dict[str, str] | None:
        """The table's columns → canonical type names (DescribeTable), or ``None`` when it does not exist."""
        schema, name = split_table(table)
        client = hook.conn
        try:
            described = client.describe_table(**self._target(), Schema=schema or "public", Table=name)
        except client.exceptions.ResourceNotFoundException:
            return None
        columns = described.get("ColumnList") or []
        return {c["name"]: canonical(c.get("typeName", "")) for c in columns} or None

    def wait(self, hook: Any, statement_id: str) -> dict[str, Any]:
        """Wait for the batch to finish, at most ``wait_timeout`` seconds; return its description."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            described = hook.conn.describe_statement(Id=statement_id)
            status = described["Status"]
            if status == "FINISHED":
                return described
            if status in _STATES_FAILED:
                raise RuntimeError(
                    f"Redshift statement {statement_id} {status}: {described.get('Error', '')}. Nothing was "
                    "changed (the batch is one transaction)."
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Redshift statement {statement_id} still {status} after {self.wait_timeout:.0f} s. "
                    "It goes on in Redshift and commits or rolls back as a whole: check it with "
                    f"`aws redshift-data describe-statement --id {statement_id}` before rerunning."
                )
            time.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))

    @staticmethod
    def _counts(described: dict[str, Any]) -> tuple[int, int, int] | None:
        """(rows deleted, rows inserted, rejects inserted) from the batch's sub-statements, when reported."""
        deleted, inserted = [], []
        for sub in described.get("SubStatements", []):
            text = sub.get("QueryString", "").lstrip().upper()
            if text.startswith("DELETE FROM"):
                deleted.append(int(sub.get("ResultRows", -1)))
            elif text.startswith("INSERT INTO"):
                inserted.append(int(sub.get("ResultRows", -1)))
        if len(deleted) == 2 and len(inserted) == 2:
            return deleted[0], inserted[0], inserted[1]
        return None
