"""PersistOutputsOperator: commit every chunk's outputs to the warehouse, replacing the run's partition."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

from airflow.sdk import Asset, AssetAlias, BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_batch_infer import storage
from airflow_batch_infer.allowlist import check_sink
from airflow_batch_infer.assets import TableLocation, output_alias_name, table_location
from airflow_batch_infer.links import OutputTableLink, RunReportLink
from airflow_batch_infer.partition import resolve_partition
from airflow_batch_infer.runtimes.lease import keep_renewed
from airflow_batch_infer.sinks import get_sink, sink_options
from airflow_batch_infer.sinks.base import PersistResult
from airflow_batch_infer.slot_release import release_slot_at_exit
from airflow_batch_infer.staging import (
    SUMMARY,
    ChunkDescriptor,
    Manifest,
    RunPath,
    output_part_path,
    rejects_part_path,
    run_file,
    write_json_atomically,
)
from airflow_batch_infer.templated import all_items, as_optional_fraction


class IncompleteRunError(RuntimeError):
    """Some chunk has no complete output: persisting now would lose rows."""


class PersistOutputsOperator(BaseOperator):
    """Replace the run's partition of the warehouse table with all chunk outputs, in one transaction.

    Before writing, every chunk of the manifest must have its output and rejects parts, and together
    they must hold exactly the chunk's rows: a run that would lose or double a row fails here instead.
    The parts are read where the infer tasks wrote them, on local disk or object storage.

    :param chunks: the stage task's chunk descriptors (``stage.output``).
    :param table: output table; rows set aside go to ``<table>_rejects``.
    :param sink: warehouse kind: ``duckdb``, ``postgres``, ``s3_parquet``, ``redshift``, ``athena`` or
        ``iceberg``.
    :param sink_options: keyword options of the sink (a dict, or its JSON text from a template), e.g.
        ``database`` (duckdb), ``postgres_conn_id`` (postgres), ``path`` (s3_parquet), ``warehouse`` or
        ``catalog_conn_id`` (iceberg).
    :param partition: the run's partition key (default: from the run's data interval or logical date).
    :param partition_column: column holding the partition key.
    :param results: the infer tasks' results (``infer.output``), used for the throughput summary.
    :param max_rejected_fraction: fail, writing nothing, when more than this share of rows was set aside.
    :param allowed_roots: where the sink may write (``sink_options`` paths and URLs), when restricted
        (:mod:`airflow_batch_infer.allowlist`); the stage task checks the same before anything is staged.
    :param allowed_conn_ids: the connections ``sink_options`` may name, when restricted.
    :param server: the start task's servers (``start.output``), whose leases persist renews while it
        writes: pass it where the servers outlive persist (a DAG that stops them after it).
    :param runtime_options: the start task's runtime options (to renew a container server's lease).
    :param write_report: write the run report and send its metrics after the commit, in this task;
        ``batch_inference`` leaves it to a ``RunReportOperator`` after persist, off the data path.
    """

    template_fields: Sequence[str] = (
        "chunks",
        "table",
        "sink",
        "sink_options",
        "partition",
        "results",
        "max_rejected_fraction",
    )
    template_fields_renderers = {"sink_options": "json"}
    ui_color = "#fdf2d0"
    operator_extra_links = (OutputTableLink(), RunReportLink())

    def __init__(
        self,
        *,
        chunks: list[dict[str, Any]],
        table: str,
        sink: str = "duckdb",
        sink_options: dict[str, Any] | None = None,
        partition: str | None = None,
        partition_column: str = "batch_partition",
        results: list[dict[str, Any]] | None = None,
        max_rejected_fraction: float | str | None = None,
        allowed_roots: list[str] | None = None,
        allowed_conn_ids: list[str] | None = None,
        server: dict[str, Any] | None = None,
        runtime_options: dict[str, Any] | None = None,
        write_report: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.chunks = chunks
        self.table = table
        self.sink = sink
        self.sink_options = sink_options or {}
        self.partition = partition
        self.partition_column = partition_column
        self.results = results
        self.max_rejected_fraction = max_rejected_fraction
        self.allowed_roots = allowed_roots
        self.server = server
        self.runtime_options = runtime_options
        self.write_report = write_report
        self.allowed_conn_ids = allowed_conn_ids
        # The output table's Asset is known once the sink's options are rendered: it is emitted through
        # this alias (a downstream DAG schedules on the Asset, see assets.output_asset, or on the alias).
        self.output_alias = AssetAlias(name=output_alias_name(self.dag_id, self.task_id))
        self.outlets = [*self.outlets, self.output_alias]

    @staticmethod
    def _collect_parts(
        manifest: Manifest, results: list[dict[str, Any]]
    ) -> tuple[list[RunPath], list[RunPath], int]:
        """Check every chunk's parts and return them with the number of rows set aside.

        A chunk's outputs, rows set aside and rows its infer task filtered out (``filter=`` on a snapshot
        by reference, from its result) must add up to the chunk's rows.
        """
        indexes = [int(r["index"]) for r in results]
        filtered = dict(zip(indexes, filtered_in_read(results), strict=True))
        outputs: list[RunPath] = []
        rejects: list[RunPath] = []
        rejected = 0
        from airflow_batch_infer.parquet_files import open_parquet  # Arrow: not for the DAG's parse

        problems = []
        for chunk in manifest.chunks:
            out, rej = (
                output_part_path(manifest.run_dir, chunk.index),
                rejects_part_path(manifest.run_dir, chunk.index),
            )
            if not storage.exists(out) or not storage.exists(rej):
                problems.append(f"chunk {chunk.index} has no output part (its infer task did not finish)")
                continue
            n_out, n_rej = open_parquet(out).metadata.num_rows, open_parquet(rej).metadata.num_rows
            n_filtered = filtered.get(chunk.index, 0)
            if n_out + n_rej + n_filtered != chunk.rows:
                problems.append(
                    f"chunk {chunk.index} staged {chunk.rows} rows but has {n_out} outputs "
                    f"+ {n_rej} set aside" + (f" + {n_filtered} filtered out" if n_filtered else "")
                )
            outputs.append(out)
            rejects.append(rej)
            rejected += n_rej
        if problems:
            raise IncompleteRunError(
                "Not persisting: " + "; ".join(problems) + ". Clear the failed infer task(s) to rerun them."
            )
        return outputs, rejects, rejected

    def execute(self, context: Any) -> dict[str, Any]:
        release_slot_at_exit()
        options = sink_options(self.sink_options)
        check_sink(self.sink, options, self.allowed_roots, self.allowed_conn_ids)
        if not self.chunks:
            raise IncompleteRunError("No chunk descriptors: the stage task staged nothing.")
        run_dir = ChunkDescriptor.from_dict(self.chunks[0]).run_dir
        manifest = Manifest.load(run_dir)
        partition = resolve_partition(context, self.partition)
        results = all_items(self.results)
        outputs, rejects, rejected = self._collect_parts(manifest, results)
        share = rejected / manifest.total_rows if manifest.total_rows else 0.0
        try:
            limit = as_optional_fraction(self.max_rejected_fraction, "max_rejected_fraction")
        except ValueError as error:  # bad input: a retry renders the same text
            raise AirflowFailException(str(error)) from error
        if limit is not None and share > limit:
            raise IncompleteRunError(
                f"{rejected:,} of {manifest.total_rows:,} rows ({share:.2%}) were set aside, more than "
                f"max_rejected_fraction={self.max_rejected_fraction}: nothing written. The reasons are in "
                f"{run_file(run_dir, 'rejects')}."
            )
        sink = get_sink(self.sink, table=self.table, partition_column=self.partition_column, **options)
        renewing = keep_renewed(self.server, self.runtime_options) if self.server else nullcontext()
        # The table's Asset URI is formed beside the load: Airflow's first Asset with a URI imports every
        # provider's URI handlers (the amazon provider's import boto3: 0.2-0.3 s of this task).
        with ThreadPoolExecutor(1, thread_name_prefix="asset-uri") as pool:
            location = pool.submit(table_location, self.sink, self.table, options)
            started = time.monotonic()
            with renewing:
                result = sink.replace_partition(partition, outputs, rejects)
            seconds = time.monotonic() - started
        summary = result.to_dict() | {
            "total_rows": manifest.total_rows,
            "chunks": len(manifest.chunks),
            "persist_seconds": round(seconds, 3),
            "persist_rows_per_second": round(manifest.total_rows / seconds, 1) if seconds else None,
        }
        if results:
            infer_seconds = sum(float(r["seconds"]) for r in results)
            summary["infer_rows_per_second_per_task"] = (
                round(manifest.total_rows / infer_seconds, 1) if infer_seconds else None
            )
            summary.update(rows_per_server(results))
            if summary["rows_per_server"]:
                self.log.info("Rows scored per Triton server: %s", summary["rows_per_server"])
            if summary["moved_chunks"]:
                self.log.warning("Chunks that moved to another server: %s", summary["moved_chunks"])
        summary["filtered_rows"] = manifest.filtered_rows + sum(filtered_in_read(results))
        summary.update(
            self._emit_output_asset(context, location, result, seconds, manifest, outputs, rejects)
        )
        write_json_atomically(run_file(run_dir, SUMMARY), summary)
        if self.write_report:  # the partition is committed: a report that fails is only logged
            from airflow_batch_infer.report import publish_run_report

            tags = {"dag_id": self.dag_id, "table": result.table}
            publish_run_report(manifest, results, result, summary["persist_seconds"], rejects, tags, self.log)
        self.log.info(
            "Persisted partition %s: %s rows in %s, %s set aside in %s (%s); it held %s rows before; "
            "%.2f s, %s rows/s",
            partition,
            f"{result.rows:,}",
            result.table,
            f"{result.rejected:,}",
            result.rejects_table,
            result.location,
            f"{result.replaced:,}" if result.replaced >= 0 else "an unknown number of",
            seconds,
            f"{manifest.total_rows / seconds:,.0f}" if seconds else "-",
        )
        return summary

    def _emit_output_asset(
        self,
        context: Any,
        location_formed: Future[TableLocation],
        result: PersistResult,
        seconds: float,
        manifest: Manifest,
        outputs: list[RunPath],
        rejects: list[RunPath],
    ) -> dict[str, Any]:
        """Emit the output table's Asset event (rows, rejected rows, rows/s in its ``extra``); keep what the
        lineage and the links need. Returns the summary's ``output_uri`` and ``run_dir``."""
        rows_per_second = round(manifest.total_rows / seconds, 1) if seconds else None
        try:
            location = location_formed.result()
        except Exception as error:  # the table is committed: a name we cannot form fails nothing
            self.log.warning("No Asset event for %s: its URI could not be formed: %s", self.table, error)
            return {"output_uri": None, "run_dir": str(manifest.run_dir)}
        extra = {
            "rows": result.rows,
            "rejected": result.rejected,
            "rows_per_second": rows_per_second,
            "partition": result.partition,
            "rejects_table": result.rejects_table,
        }
        if "outlet_events" in context:  # not when execute() is called outside a task run
            context["outlet_events"][self.output_alias].add(Asset(uri=location.uri), extra=extra)
        self._persisted = (manifest, location, result, outputs, rejects)
        return {"output_uri": location.uri, "run_dir": str(manifest.run_dir)}

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: the snapshot → the output table and ``<table>_rejects``, with schemas and rows.

        :param task_instance: the finished task instance (unused: what persist wrote is kept).
        """
        from airflow_batch_infer.lineage import persist_lineage
        from airflow_batch_infer.parquet_files import open_parquet

        if not hasattr(self, "_persisted"):
            return None
        manifest, location, result, outputs, rejects = self._persisted
        schemas = [open_parquet(parts[0]).schema_arrow if parts else None for parts in (outputs, rejects)]
        return persist_lineage(manifest, location, result.rows, result.rejected, *schemas)


def rows_per_server(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rows each server scored, and the chunks that moved off a server, from the infer tasks' results."""
    rows: dict[str, int] = {}
    moved: dict[str, list[str]] = {}
    for result in results:
        if result.get("server"):
            rows[result["server"]] = rows.get(result["server"], 0) + int(result.get("rows_out") or 0)
        if result.get("moved_from"):
            moved[str(result.get("index"))] = list(result["moved_from"])
    return {"rows_per_server": rows, "moved_chunks": moved}


def filtered_in_read(results: Sequence[dict[str, Any]]) -> list[int]:
    """Rows each infer task's read filtered out (``filter=`` on a snapshot by reference)."""
    return [int(r.get("filtered_rows") or 0) for r in results]
