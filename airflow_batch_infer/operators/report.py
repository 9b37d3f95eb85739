"""RunReportOperator: the run report and its metrics, written after persist, off the run's data path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_batch_infer.sinks.base import PersistResult
from airflow_batch_infer.slot_release import release_slot_at_exit
from airflow_batch_infer.staging import ChunkDescriptor, Manifest, rejects_part_path


class RunReportOperator(BaseOperator):
    """Write ``report.json`` and ``report.html`` into the run folder and send the run's figures to Airflow's
    metrics (:mod:`airflow_batch_infer.report`, :mod:`airflow_batch_infer.run_metrics`).

    It runs after persist, so that the table is committed without waiting for the charts. The partition is
    committed already: a report that cannot be built is logged as a warning, and the task succeeds.

    :param chunks: the stage task's chunk descriptors (``stage.output``).
    :param results: the infer tasks' results (``infer.output``).
    :param persisted: persist's summary (``persist.output``).
    """

    template_fields: Sequence[str] = ("chunks", "results", "persisted")
    ui_color = "#fdf2d0"

    def __init__(
        self,
        *,
        chunks: list[dict[str, Any]],
        results: list[dict[str, Any]] | None,
        persisted: dict[str, Any],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.chunks = chunks
        self.results = results
        self.persisted = persisted

    def execute(self, context: Any) -> str | None:
        release_slot_at_exit()
        from airflow_batch_infer.report import publish_run_report

        try:
            manifest = Manifest.load(ChunkDescriptor.from_dict(self.chunks[0]).run_dir)
            summary = dict(self.persisted)
            persisted = PersistResult(**{k: summary[k] for k in PersistResult.__dataclass_fields__})
        except Exception as error:  # the partition is committed: no report is only a warning
            self.log.warning("The run report could not be written: %s", error, exc_info=True)
            return None
        rejects = [rejects_part_path(manifest.run_dir, c.index) for c in manifest.chunks]
        tags = {"dag_id": self.dag_id, "table": persisted.table}
        report = publish_run_report(
            manifest,
            self.results or [],
            persisted,
            float(summary["persist_seconds"]),
            rejects,
            tags,
            self.log,
        )
        return str(report) if report is not None else None
