"""The partition key of a run: the slice of the warehouse table that the run owns and replaces."""

from __future__ import annotations

import re
from typing import Any

_PARTITION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=+-]{0,127}")


def resolve_partition(context: Any, explicit: str | None = None) -> str:
    """Return the run's partition key.

    In order: ``explicit`` (a Param of a manual backfill), the run's asset partition key, the start of
    its data interval, its logical date, and last the date it was scheduled after. Running the same
    logical date twice therefore gives the same key, and the second run replaces the first.

    :param context: the task's Airflow context.
    :param explicit: a key chosen by the DAG author or the person triggering the run.
    """
    candidates: list[Any] = [explicit, context.get("partition_key")]
    for name in ("data_interval_start", "logical_date"):
        moment = context.get(name)
        candidates.append(moment.date().isoformat() if moment is not None else None)
    dag_run = context.get("dag_run")
    run_after = getattr(dag_run, "run_after", None)
    candidates.append(run_after.date().isoformat() if run_after is not None else None)
    for candidate in candidates:
        if candidate not in (None, "", "None"):
            return validate_partition(str(candidate))
    raise ValueError("Cannot tell the run's partition: pass partition= or run with a logical date.")


def validate_partition(key: str) -> str:
    """Refuse partition keys that are not short plain text (they name folders and SQL values).

    The whole key must match (``fullmatch``: ``$`` alone would let ``"2026-11-21\n"`` through as a second
    partition).
    """
    if not isinstance(key, str) or not _PARTITION.fullmatch(key):
        raise ValueError(
            f"Partition key {key!r} is not valid: use up to 128 letters, digits and . _ : = + - "
            "(for example 2026-11-21)."
        )
    return key
