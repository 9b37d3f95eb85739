"""Where the rows to score come from: Parquet files (local or object storage) or a SQL query.

Each source is read once per run, as Arrow record batches, by the stage task, which snapshots it into
chunk files; the mapped infer tasks read only those chunks, so every task sees the same rows.
"""

from __future__ import annotations

from airflow_batch_infer.sources.base import Source
from airflow_batch_infer.sources.parquet import ParquetSource
from airflow_batch_infer.sources.sql import SQLQuerySource

__all__ = ["ParquetSource", "SQLQuerySource", "Source"]
