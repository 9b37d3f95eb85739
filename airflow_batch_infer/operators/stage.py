"""StageInputsOperator: snapshot the input into chunk files and a manifest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, conf

from airflow_batch_infer.partition import resolve_partition
from airflow_batch_infer.paths import batch_infer_home
from airflow_batch_infer.staging import run_directory, stage_parquet


class StageInputsOperator(BaseOperator):
    """Snapshot Parquet input into chunk files plus ``manifest.json``; return one descriptor per chunk.

    The descriptors (path, rows, bytes) are what the mapped infer task expands over; rows never go
    through XCom. The chunk count is kept within ``[core] max_map_length``.

    :param source: a Parquet file or folder (hive partitions understood), or a list of them.
    :param staging_root: root folder of run snapshots (default ``$BATCH_INFER_HOME/staging``).
    :param chunk_rows: rows per chunk, raised when needed to stay within ``max_map_length``.
    :param columns: columns to stage (all when ``None``).
    :param row_id_column: the input's own unique row id; when ``None`` a ``row_id`` column is added.
    :param partition: the run's partition key (default: from the run's data interval or logical date).
    """

    template_fields: Sequence[str] = ("source", "staging_root", "chunk_rows", "columns", "partition")
    ui_color = "#e8f4fd"

    def __init__(
        self,
        *,
        source: str | list[str],
        staging_root: str | None = None,
        chunk_rows: int | str = 250_000,
        columns: list[str] | None = None,
        row_id_column: str | None = None,
        partition: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.staging_root = staging_root
        self.chunk_rows = chunk_rows
        self.columns = columns
        self.row_id_column = row_id_column
        self.partition = partition

    def execute(self, context: Any) -> list[dict[str, Any]]:
        partition = resolve_partition(context, self.partition)
        root = self.staging_root or str(batch_infer_home() / "staging")
        run_dir = run_directory(root, self.dag_id, partition, context["run_id"])
        max_chunks = conf.getint("core", "max_map_length", fallback=1024)
        manifest = stage_parquet(
            self.source,
            run_dir,
            chunk_rows=int(self.chunk_rows),
            columns=self.columns or None,
            row_id_column=self.row_id_column,
            max_chunks=max_chunks,
        )
        if not manifest.chunks:
            raise ValueError(f"The input {self.source} has no rows: nothing to score.")
        self.log.info(
            "Staged %s rows from %s into %d chunk(s) of up to %s rows under %s (partition %s)",
            f"{manifest.total_rows:,}",
            self.source,
            len(manifest.chunks),
            f"{manifest.chunk_rows:,}",
            run_dir,
            partition,
        )
        return [chunk.to_dict() for chunk in manifest.chunks]
