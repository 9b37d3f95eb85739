"""A SQL source's ranged-export options, checked where a DAG is parsed (without the sources' imports)."""

from __future__ import annotations

import os

from airflow_batch_infer.errors import StagingError


def default_export_parallelism() -> int:
    """Ranges exported at once when not set: the cores, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def check_split_column(value: str | None) -> str | None:
    """``split_column`` as given (``None`` when empty), refused when it is not a column name."""
    if value is None or str(value).strip() in ("", "None"):
        return None
    if not isinstance(value, str):
        raise StagingError(f"split_column must be the name of a column of the query, got {value!r}.")
    return value.strip()


def check_export_parallelism(value: int | str | None) -> int:
    """``export_parallelism`` as a whole number of at least 1 (``None``: the default)."""
    if value is None or str(value).strip() in ("", "None"):
        return default_export_parallelism()
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or number < 1:
        raise StagingError(
            f"export_parallelism must be a whole number of at least 1 (1: no ranges), got {value!r}."
        )
    return number
