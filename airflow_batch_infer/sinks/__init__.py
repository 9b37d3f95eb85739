"""Warehouse writers. Each replaces exactly one partition of a table, atomically."""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from typing import Any

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

# Sinks whose table is made of the part files themselves, as they are: their parts are worth compressing
# wherever they are written (a scan is paid by the byte).
PARTS_ARE_THE_TABLE = frozenset({"s3_parquet", "athena"})


def get_sink(name: str, **options: Any) -> WarehouseSink:
    """Return the sink called ``name`` configured with ``options``.

    :param name: ``duckdb``, ``postgres``, ``s3_parquet``, ``redshift``, ``athena`` or ``iceberg``.
    :param options: keyword arguments of that sink's constructor (``table``, ``partition_column``,
        ``create_table`` and the sink's own: connection, database, location...).
    """
    if name not in SINKS:
        raise ValueError(f"Unknown sink {name!r}; available: {', '.join(repr(s) for s in SINKS)}.")
    module, _, cls = SINKS[name].partition(":")
    sink_class = getattr(importlib.import_module(module), cls)
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
