"""How many rows a chunk holds: one mapped infer task each, sized for the engine that runs the tasks."""

from __future__ import annotations

import math

from airflow_batch_infer.errors import StagingError

# chunk_rows="auto": one chunk per parallel infer task, each of at least this many rows (a task's start
# and its first connection cost a second or more under a real scheduler) and at most this many (a retry
# redoes one chunk).
AUTO_MIN_CHUNK_ROWS = 500_000
AUTO_MAX_CHUNK_ROWS = 25_000_000


def plan_chunk_rows(total_rows: int, chunk_rows: int | str, max_chunks: int, parallel_tasks: int = 1) -> int:
    """Rows per chunk: ``chunk_rows``, raised as needed so the chunk count stays within ``max_chunks``.

    ``chunk_rows="auto"`` gives one chunk per parallel infer task (``parallel_tasks``), each of at least
    :data:`AUTO_MIN_CHUNK_ROWS` rows, and more chunks, in whole rounds of ``parallel_tasks``, where a
    chunk would exceed :data:`AUTO_MAX_CHUNK_ROWS`.

    :param total_rows: rows to stage (0 when not known beforehand).
    :param chunk_rows: rows per chunk, or ``"auto"``.
    :param max_chunks: most chunks allowed (Airflow's ``max_map_length``).
    :param parallel_tasks: infer tasks that can run at once (for ``"auto"``).
    """
    if str(chunk_rows).strip().lower() == "auto":
        slots = max(1, int(parallel_tasks))
        rounds = max(1, math.ceil(total_rows / (slots * AUTO_MAX_CHUNK_ROWS)))
        chunk_rows = max(AUTO_MIN_CHUNK_ROWS, math.ceil(total_rows / (slots * rounds)))
    try:
        chunk_rows = int(chunk_rows)
    except ValueError:
        raise StagingError(f"chunk_rows must be a number of rows or 'auto', got {chunk_rows!r}.") from None
    if chunk_rows <= 0:
        raise StagingError(f"chunk_rows must be positive, got {chunk_rows}.")
    return max(chunk_rows, math.ceil(total_rows / max_chunks)) if total_rows else chunk_rows
