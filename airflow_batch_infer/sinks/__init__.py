"""Warehouse writers. Each replaces exactly one partition of a table, atomically."""

from __future__ import annotations

from typing import Any

from airflow_batch_infer.sinks.base import PersistResult, SchemaMismatchError, WarehouseSink

__all__ = ["PersistResult", "SchemaMismatchError", "WarehouseSink", "get_sink"]


def get_sink(name: str, **options: Any) -> WarehouseSink:
    """Return the sink called ``name`` configured with ``options``.

    :param name: ``duckdb`` (more sinks register here as they are added).
    :param options: keyword arguments of that sink's constructor.
    """
    if name == "duckdb":
        from airflow_batch_infer.sinks.duckdb import DuckDBSink

        return DuckDBSink(**options)
    raise ValueError(f"Unknown sink {name!r}; available: 'duckdb'.")
