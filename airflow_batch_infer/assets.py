"""Where a run's output table lives, named once for the persist task's Asset, its lineage and its links.

Each sink's table gets a URI (the ``Asset`` that persist emits, that downstream DAGs schedule on) and an
OpenLineage ``(namespace, name)``, following the OpenLineage naming conventions where they name one:

============  ==========================================  =============================================
sink          Asset URI                                   OpenLineage namespace, name
============  ==========================================  =============================================
duckdb        ``duckdb:///<database file>/<table>``       ``duckdb:///<database file>``, ``main.<table>``
postgres      ``postgres://host:port/db/schema/table``    ``postgres://host:port``, ``db.schema.table``
s3_parquet    ``s3://bucket/prefix/<table>`` (``file://``  ``s3://bucket``, ``prefix/<table>`` (``file``,
              for a local path)                           the path)
redshift      ``redshift://cluster:5439/db/schema/table``  ``redshift://cluster:5439``, ``db.schema.table``
athena        ``awsathena://athena.<region>.amazonaws.com  ``awsathena://athena.<region>.amazonaws.com``,
              /AwsDataCatalog/db/table``                  ``AwsDataCatalog.db.table``
iceberg       ``iceberg://<catalog>/<namespace>/<table>``  ``iceberg://<catalog>``, ``namespace.table``
============  ==========================================  =============================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from airflow_batch_infer import storage
from airflow_batch_infer.paths import batch_infer_home

#: The persist task's AssetAlias name is this prefix and the task's ``dag_id.task_id``.
ALIAS_PREFIX = "batch-infer-output:"


@dataclass(frozen=True)
class TableLocation:
    """One table of a sink: its Asset URI and its OpenLineage dataset name.

    :param uri: the Asset URI, as Airflow normalizes it (``duckdb:///f/t`` becomes ``duckdb:/f/t``).
    :param namespace: the OpenLineage dataset namespace.
    :param name: the OpenLineage dataset name.
    """

    uri: str
    namespace: str
    name: str


def file_dataset(location: str) -> tuple[str, str]:
    """OpenLineage ``(namespace, name)`` of a file or folder: ``("file", path)`` or ``("s3://bucket", key)``.

    :param location: a local path or a URL (``s3://conn@bucket/key``: the connection id is dropped).
    """
    url = storage.plain_url(location)
    parts = urlsplit(url)
    if not parts.scheme:
        return "file", url
    return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/")


def _schema_table(table: str, default_schema: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return schema or default_schema, name


def _postgres(table: str, options: Mapping[str, Any]) -> TableLocation:
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(options.get("postgres_conn_id") or "postgres_default")
    authority = f"{conn.host}:{conn.port or 5432}"
    schema, name = _schema_table(table, "public")
    database = conn.schema or "postgres"
    return TableLocation(
        f"postgres://{authority}/{database}/{schema}/{name}",
        f"postgres://{authority}",
        f"{database}.{schema}.{name}",
    )


def _s3_parquet(table: str, options: Mapping[str, Any]) -> TableLocation:
    folder = storage.join(storage.location(str(options["path"]), options.get("conn_id")), table)
    namespace, name = file_dataset(folder)
    uri = storage.plain_url(folder)
    return TableLocation(uri if "://" in uri else f"file://{uri}", namespace, name)


def _aws_region(options: Mapping[str, Any]) -> str:
    if options.get("region_name"):
        return str(options["region_name"])
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    return AwsBaseHook(aws_conn_id=options.get("aws_conn_id", "aws_default")).conn_region_name or "us-east-1"


def _redshift(table: str, options: Mapping[str, Any]) -> TableLocation:
    where = options.get("cluster_identifier") or options.get("workgroup_name")
    authority = f"{where}.{_aws_region(options)}:5439"
    schema, name = _schema_table(table, "public")
    database = options.get("database")
    return TableLocation(
        f"redshift://{authority}/{database}/{schema}/{name}",
        f"redshift://{authority}",
        f"{database}.{schema}.{name}",
    )


def _athena(table: str, options: Mapping[str, Any]) -> TableLocation:
    database, name = _schema_table(table, str(options.get("database") or "default"))
    host = f"athena.{_aws_region(options)}.amazonaws.com"
    return TableLocation(
        f"awsathena://{host}/AwsDataCatalog/{database}/{name}",
        f"awsathena://{host}",
        f"AwsDataCatalog.{database}.{name}",
    )


def _iceberg(table: str, options: Mapping[str, Any]) -> TableLocation:
    catalog = options.get("catalog_conn_id") or options.get("catalog_name") or "default"
    namespace, name = _schema_table(table, "default")
    return TableLocation(
        f"iceberg://{catalog}/{namespace}/{name}", f"iceberg://{catalog}", f"{namespace}.{name}"
    )


def _duckdb(table: str, options: Mapping[str, Any]) -> TableLocation:
    database = storage.plain_url(str(options.get("database") or batch_infer_home() / "warehouse.duckdb"))
    schema, name = _schema_table(table, "main")
    return TableLocation(f"duckdb://{database}/{schema}.{name}", f"duckdb://{database}", f"{schema}.{name}")


_NAMERS = {
    "duckdb": _duckdb,
    "postgres": _postgres,
    "s3_parquet": _s3_parquet,
    "redshift": _redshift,
    "athena": _athena,
    "iceberg": _iceberg,
}


def table_location(sink: str, table: str, options: Mapping[str, Any] | None = None) -> TableLocation:
    """The Asset URI and OpenLineage name of ``table`` in ``sink``, from the sink's (rendered) options.

    :param sink: the sink kind (``duckdb``, ``postgres``, ``s3_parquet``, ``redshift``, ``athena``,
        ``iceberg``).
    :param table: ``table`` or ``schema.table``.
    :param options: the sink's options, as given to the persist task.
    """
    from airflow.sdk import Asset

    if sink not in _NAMERS:
        raise ValueError(f"Unknown sink {sink!r}: use one of {sorted(_NAMERS)}.")
    location = _NAMERS[sink](table, dict(options or {}))
    return replace(location, uri=Asset(uri=location.uri).uri)  # as Airflow normalizes it


def output_asset(sink: str, table: str, options: Mapping[str, Any] | None = None) -> Any:
    """The ``Asset`` that the persist task emits for ``table``: schedule a downstream DAG on it.

    :param sink: the sink kind.
    :param table: the output table.
    :param options: the sink's options, as given to the persist task.
    """
    from airflow.sdk import Asset

    return Asset(uri=table_location(sink, table, options).uri)


def output_alias_name(dag_id: str, task_id: str) -> str:
    """The name of the ``AssetAlias`` through which a persist task emits its table's Asset.

    :param dag_id: the persist task's DAG.
    :param task_id: the persist task's id (with its TaskGroup prefix).
    """
    return f"{ALIAS_PREFIX}{dag_id}.{task_id}"
