"""Warehouse writers. Each replaces exactly one partition of a table, atomically.

Besides the built-in ones (:data:`SINKS`), a site's own :class:`WarehouseSink` subclass is used by its class
path (``sink="my_pkg.sinks:BigQuerySink"``) or by the name of an entry point in the
``airflow_batch_infer.sinks`` group (:mod:`airflow_batch_infer.plugins`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from airflow_batch_infer.plugins import SINK_GROUP, resolve_plugin
from airflow_batch_infer.sinks.base import PersistResult, SchemaMismatchError, WarehouseSink

__all__ = [
    "PARTS_ARE_THE_TABLE",
    "SINKS",
    "PersistResult",
    "SchemaMismatchError",
    "WarehouseSink",
    "get_sink",
    "sink_options",
]

# Sink name → "module:class"; imported on use, so that a sink's client library is needed only by its users.
SINKS = {
    "duckdb": "airflow_batch_infer.sinks.duckdb:DuckDBSink",
    "postgres": "airflow_batch_infer.sinks.postgres:PostgresSink",
    "s3_parquet": "airflow_batch_infer.sinks.s3_parquet:S3ParquetSink",
    "redshift": "airflow_batch_infer.sinks.redshift:RedshiftSink",
    "athena": "airflow_batch_infer.sinks.athena:AthenaSink",
    "iceberg": "airflow_batch_infer.sinks.iceberg:IcebergSink",
}
# Built-in sink → the pip extra that brings its client libraries (the duckdb sink needs only the core).
SINK_EXTRAS = {
    "postgres": "postgres",
    "s3_parquet": "amazon",
    "redshift": "amazon",
    "athena": "amazon",
    "iceberg": "iceberg",
}

# Sinks whose table is made of the part files themselves, as they are: their parts are worth compressing
# wherever they are written (a scan is paid by the byte).
PARTS_ARE_THE_TABLE = frozenset({"s3_parquet", "athena"})


def get_sink(name: str, **options: Any) -> WarehouseSink:
    """Return the sink called ``name`` configured with ``options``.

    :param name: ``duckdb``, ``postgres``, ``s3_parquet``, ``redshift``, ``athena``, ``iceberg``, an
        entry point of the ``airflow_batch_infer.sinks`` group, or a class path ``"my_pkg.module:MySink"``.
    :param options: keyword arguments of that sink's constructor (``table``, ``partition_column``,
        ``create_table`` and the sink's own: connection, database, location...).
    """
    try:
        sink_class = resolve_plugin(name, SINKS, SINK_GROUP, "sink", WarehouseSink)
    except ValueError as err:
        if name in SINK_EXTRAS and isinstance(err.__cause__, ImportError):
            raise ImportError(
                f"The {name!r} sink needs `pip install 'airflow-provider-batch-infer[{SINK_EXTRAS[name]}]'`: "
                f"{err.__cause__}"
            ) from err
        raise
    try:
        return sink_class(**options)
    except TypeError as err:
        raise TypeError(f"Sink {name!r}: {err}. See {sink_class.__name__}'s parameters.") from err


def sink_options(options: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """A sink's options as a dict: given as one, or as its JSON text (``{{ params.x | tojson }}``).

    :param options: the options, rendered.
    """
    if isinstance(options, str):
        options = json.loads(options) if options.strip() else {}
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"sink_options must be a mapping (or its JSON text), got {type(options).__name__}.")
    return dict(options)
