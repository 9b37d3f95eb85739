"""The Iceberg catalog the iceberg sink commits through: an embedded SQL catalog, or one a connection names.

Without a connection the catalog is pyiceberg's SQL catalog on a SQLite file,
``<warehouse>/catalog.db``, with the tables' files under the same local ``warehouse`` folder
(``$BATCH_INFER_HOME/iceberg`` by default): nothing to run, and any engine that reads an Iceberg
table's metadata file reads the result. A Glue, REST or shared SQL catalog is named by an Airflow
connection whose extra holds pyiceberg's catalog properties (``type``, ``uri``, ``warehouse``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from airflow_batch_infer import storage
from airflow_batch_infer.paths import batch_infer_home

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog

#: The SQLite file of the embedded catalog, inside its warehouse folder.
CATALOG_FILE = "catalog.db"


def default_warehouse() -> Path:
    """The embedded catalog's warehouse folder: ``$BATCH_INFER_HOME/iceberg``."""
    return batch_infer_home() / "iceberg"


def connection_properties(conn_id: str) -> dict[str, str]:
    """pyiceberg catalog properties from an Airflow connection.

    The extra holds the properties themselves (``{"type": "rest", "uri": "https://...", "warehouse":
    "prod"}``, ``{"type": "glue", "glue.region": "eu-west-1"}``). The connection's fields fill what the
    extra leaves out: ``host`` the ``uri``; ``login`` and ``password`` a REST catalog's OAuth2
    ``credential`` (``login:password``), or its bearer ``token`` when there is no login.

    :param conn_id: the connection's id.
    """
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    properties = {str(k): _text(v) for k, v in (conn.extra_dejson or {}).items()}
    if conn.host and "uri" not in properties:
        properties["uri"] = conn.host
    if properties.get("type") == "rest" and conn.password:
        if conn.login:
            properties.setdefault("credential", f"{conn.login}:{conn.password}")
        else:
            properties.setdefault("token", conn.password)
    if "type" not in properties:
        raise ValueError(
            f"Connection {conn_id!r} names no catalog type: put pyiceberg catalog properties in its extra, "
            'e.g. {"type": "glue"} or {"type": "rest", "uri": "https://catalog.example.com"}.'
        )
    return properties


def aws_properties(aws_conn_id: str) -> dict[str, str]:
    """The credentials and region of an ``aws`` connection as pyiceberg properties, for Glue and S3.

    :param aws_conn_id: the connection's id.
    """
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    hook = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="sts")
    session = hook.get_session()
    credentials = session.get_credentials()
    properties: dict[str, str] = {}
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        properties["client.access-key-id"] = frozen.access_key
        properties["client.secret-access-key"] = frozen.secret_key
        if frozen.token:
            properties["client.session-token"] = frozen.token
    if session.region_name:
        properties["client.region"] = session.region_name
    endpoint = hook.conn_config.endpoint_url
    if endpoint:
        properties["s3.endpoint"] = endpoint
        properties["glue.endpoint"] = endpoint
    return properties


def catalog_properties(
    *,
    warehouse: str | Path | None = None,
    catalog_conn_id: str | None = None,
    aws_conn_id: str | None = None,
    catalog: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The properties of the sink's catalog: the embedded SQL catalog unless a connection or ``catalog``
    names another.

    In order, each overriding the one before: the connection's (or the embedded catalog's), the ``aws``
    connection's credentials, ``catalog``, and ``warehouse``.

    :param warehouse: where new tables' files go. For the embedded catalog a local folder (the SQLite file
        lies in it too).
    :param catalog_conn_id: a connection whose extra holds the catalog's properties.
    :param aws_conn_id: an ``aws`` connection for Glue and S3 credentials.
    :param catalog: further pyiceberg catalog properties.
    """
    if catalog_conn_id:
        properties = connection_properties(catalog_conn_id)
    elif catalog and "type" in catalog:
        properties = {}
    else:
        folder = storage.location(warehouse or default_warehouse())
        if storage.is_remote(folder):
            raise ValueError(
                f"The embedded Iceberg catalog keeps its SQLite file in the warehouse, which must be a local "
                f"folder, not {_without_credentials(folder)}: name a Glue, REST or SQL catalog with "
                "catalog_conn_id to keep tables on object storage."
            )
        Path(folder).mkdir(parents=True, exist_ok=True)
        properties = {
            "type": "sql",
            "uri": f"sqlite:///{Path(folder) / CATALOG_FILE}",
            "warehouse": Path(folder).as_uri(),
        }
        warehouse = None
    if aws_conn_id:
        properties.update(aws_properties(aws_conn_id))
    properties.update({str(k): _text(v) for k, v in (catalog or {}).items()})
    if warehouse:
        properties["warehouse"] = _warehouse_url(warehouse)
    return properties


def load(name: str, properties: Mapping[str, str]) -> Catalog:
    """Open the catalog ``name`` with ``properties`` (pyiceberg's ``load_catalog``)."""
    from pyiceberg.catalog import load_catalog

    return load_catalog(name, **properties)


def describe(properties: Mapping[str, str]) -> str:
    """The catalog in words, without credentials, for messages and the result's location."""
    uri = properties.get("uri")
    return f"{properties.get('type', '?')} catalog" + (f" {_without_credentials(uri)}" if uri else "")


def _without_credentials(url: str) -> str:
    """``url`` without a user, password or Airflow connection id in its netloc (read as text)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _warehouse_url(warehouse: str | Path) -> str:
    folder = storage.location(warehouse)
    return _without_credentials(folder) if storage.is_remote(folder) else Path(folder).as_uri()


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
