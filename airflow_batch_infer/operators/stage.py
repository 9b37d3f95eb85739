"""StageInputsOperator: snapshot the input (Parquet files or a SQL query) as chunks and a manifest."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, conf

from airflow_batch_infer import storage
from airflow_batch_infer.allowlist import check_conn_id, check_locations, check_sink
from airflow_batch_infer.partition import resolve_partition
from airflow_batch_infer.paths import batch_infer_home
from airflow_batch_infer.sinks import sink_options
from airflow_batch_infer.sql_options import check_export_parallelism, check_split_column
from airflow_batch_infer.staging import SNAPSHOTS, run_directory, stage_source
from airflow_batch_infer.templated import as_optional_str

if TYPE_CHECKING:
    from airflow_batch_infer.sources import Source


def _given(value: Any) -> Any:
    """``None`` for values a template rendered empty (``"{{ params.x or '' }}"``)."""
    return None if value in (None, "", "None") else value


def parallel_infer_tasks(workers_share_host: bool) -> int:
    """How many infer tasks can run at once: the executor's slots for one DAG run (``[core] parallelism``
    and ``max_active_tasks_per_dag``), and, when the workers and the server share one host (the local
    runtime), at most its cores.

    :param workers_share_host: whether every infer task runs on the host of the stage task and the server.
    """
    slots = min(
        conf.getint("core", "parallelism", fallback=32),
        conf.getint("core", "max_active_tasks_per_dag", fallback=16),
    )
    if workers_share_host:
        slots = min(slots, os.cpu_count() or 1)
    return max(1, slots)


class StageInputsOperator(BaseOperator):
    """Snapshot the input and write ``manifest.json``; return one descriptor per chunk.

    The input is either Parquet (``source``: files or folders, local or on object storage, hive partitions
    understood) or the rows of a SQL query (``sql`` on ``sql_conn_id``), read once. Parquet files are
    pinned by reference (``snapshot="reference"``, the default): the manifest records each file's size and
    version and each chunk's row-group ranges, reading only footers, and the infer tasks read the rows
    straight from the files (a file changed in between fails its chunk). ``snapshot="copy"``, and every
    SQL query, copies the rows into chunk files instead. The manifest lives under
    ``<staging_root>/<dag_id>/<partition>/<run_id>/``, on local disk or object storage
    (``s3://bucket/prefix``). The descriptors (rows, bytes, row-group ranges or a chunk file) are what the
    mapped infer task expands over; rows never go through XCom. The chunk count is kept within
    ``[core] max_map_length``.

    :param source: a Parquet file or folder, or a list of them: local paths or URLs (``s3://bucket/key``).
    :param source_conn_id: Airflow connection for a ``source`` on object storage (an ``aws`` connection).
    :param sql: a query whose rows are scored instead of ``source`` (a ``.sql`` file name is read as a
        template).
    :param sql_conn_id: a common-sql connection (``postgres``, ...) or a ``duckdb`` one; ``None`` reads the
        embedded DuckDB warehouse (``sql_database``).
    :param sql_parameters: parameters of the query, in the driver's style; never pasted into its text.
    :param sql_database: the DuckDB file queried when ``sql_conn_id`` is ``None``.
    :param sql_split_column: an integer column of a PostgreSQL query whose value ranges are exported in
        parallel, in one snapshot (default: ``row_id_column``, when it is an integer); a query that does
        not allow ranges is read as one stream (:mod:`~airflow_batch_infer.sources.sql_ranges`).
    :param sql_export_parallelism: connections exporting ranges at once (default: the cores, at most 4);
        ``1`` reads the query as one stream.
    :param staging_root: root of run snapshots (default ``$BATCH_INFER_HOME/staging``); may be a URL.
    :param staging_conn_id: Airflow connection for a ``staging_root`` on object storage.
    :param chunk_rows: rows per chunk, raised when needed to stay within ``max_map_length``; ``"auto"``
        (the default) makes one chunk per infer task that can run at once (``parallel_tasks``), of at least
        500,000 rows and at most 25,000,000 (then whole rounds of ``parallel_tasks`` chunks). Chunks by
        reference end at row-group boundaries.
    :param columns: columns to stage (all when ``None``).
    :param row_id_column: the input's own unique row id; when ``None`` a ``row_id`` column of int64 ids
        is added (0, 1, 2... over the files in the manifest's order and their rows).
    :param partition: the run's partition key (default: from the run's data interval or logical date).
    :param snapshot: ``"reference"`` (pin the Parquet files, copy nothing) or ``"copy"`` (chunk files: for
        an ETL that rewrites its files in place). SQL queries are always copied.
    :param parallel_tasks: infer tasks that can run at once, for ``chunk_rows="auto"``; ``None`` takes the
        executor's slots (:func:`parallel_infer_tasks`).
    :param workers_share_host: the infer tasks and the server run on this host (the local runtime), so at
        most its cores count as slots.
    :param allowed_roots: when given, every location the run uses (``source``, ``staging_root``,
        ``sql_database``, and the sink's paths and URLs) must lie under one of these roots
        (:mod:`airflow_batch_infer.allowlist`), checked before anything is staged.
    :param allowed_conn_ids: when given, every connection the run names (``source_conn_id``,
        ``staging_conn_id``, ``sql_conn_id``, one in a URL, the sink's) must be one of these.
    :param sink: the run's sink, checked against the allowlists here, at the run's start (templated).
    :param sink_options: the sink's options, likewise (a dict, or its JSON text from a template).
    """

    template_fields: Sequence[str] = (
        "source",
        "source_conn_id",
        "sql",
        "sql_conn_id",
        "sql_parameters",
        "sql_database",
        "sql_split_column",
        "sql_export_parallelism",
        "staging_root",
        "staging_conn_id",
        "chunk_rows",
        "columns",
        "partition",
        "snapshot",
        "sink",
        "sink_options",
        "row_id_column",
    )
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers = {
        "sql": "sql",
        "sql_parameters": "json",
        "sink_options": "json",
        "columns": "json",
    }
    ui_color = "#e8f4fd"

    def __init__(
        self,
        *,
        source: str | list[str] | None = None,
        source_conn_id: str | None = None,
        sql: str | None = None,
        sql_conn_id: str | None = None,
        sql_parameters: dict[str, Any] | list[Any] | None = None,
        sql_database: str | None = None,
        sql_split_column: str | None = None,
        sql_export_parallelism: int | str | None = None,
        staging_root: str | None = None,
        staging_conn_id: str | None = None,
        chunk_rows: int | str = "auto",
        columns: list[str] | None = None,
        row_id_column: str | None = None,
        partition: str | None = None,
        snapshot: str = "reference",
        parallel_tasks: int | None = None,
        workers_share_host: bool = False,
        allowed_roots: list[str] | None = None,
        allowed_conn_ids: list[str] | None = None,
        sink: str | None = None,
        sink_options: dict[str, Any] | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.allowed_roots = allowed_roots
        self.allowed_conn_ids = allowed_conn_ids
        self.sink = sink
        self.sink_options = sink_options
        if "{{" not in str(snapshot) and snapshot not in SNAPSHOTS:
            raise ValueError(f"snapshot must be one of {list(SNAPSHOTS)}, got {snapshot!r}.")
        self.snapshot = snapshot
        self.parallel_tasks = parallel_tasks
        self.workers_share_host = workers_share_host
        self.source = source
        self.source_conn_id = source_conn_id
        self.sql = sql
        self.sql_conn_id = sql_conn_id
        self.sql_parameters = sql_parameters
        self.sql_database = sql_database
        if not any("{{" in str(v) for v in (sql_split_column, sql_export_parallelism)):
            check_split_column(sql_split_column)  # refused at parse time, not at the run's stage
            check_export_parallelism(sql_export_parallelism)
        self.sql_split_column = sql_split_column
        self.sql_export_parallelism = sql_export_parallelism
        self.staging_root = staging_root
        self.staging_conn_id = staging_conn_id
        self.chunk_rows = chunk_rows
        self.columns = columns
        self.row_id_column = row_id_column
        self.partition = partition

    def _source(self) -> Source:
        # Imported here: pyarrow.dataset costs every parse of a DAG file that uses this operator (every
        # task process parses its DAG) about 0.2 s of CPU.
        from airflow_batch_infer.sources import ParquetSource, SQLQuerySource

        source, sql = _given(self.source), _given(self.sql)
        if (source is None) == (sql is None):
            raise ValueError("Give exactly one input: source= (Parquet files) or sql= (a query).")
        if sql is not None:
            return SQLQuerySource(
                sql,
                conn_id=_given(self.sql_conn_id),
                parameters=_given(self.sql_parameters),
                database=_given(self.sql_database),
                split_column=_given(self.sql_split_column),
                export_parallelism=_given(self.sql_export_parallelism),
            )
        return ParquetSource(source, conn_id=_given(self.source_conn_id))

    def _check_allowed(self) -> None:
        """Refuse, before anything is staged, a location or connection the allowlists do not admit."""
        roots, conn_ids = self.allowed_roots, self.allowed_conn_ids
        if roots is None and conn_ids is None:
            return
        sources = _given(self.source)
        sources = [sources] if isinstance(sources, str) else list(sources or [])
        locations = [("source", s) for s in sources]
        locations += [
            ("staging_root", _given(self.staging_root)),
            ("sql_database", _given(self.sql_database)),
        ]
        check_locations(locations, roots, conn_ids)
        for what, conn_id in (
            ("source_conn_id", self.source_conn_id),
            ("staging_conn_id", self.staging_conn_id),
            ("sql_conn_id", self.sql_conn_id),
        ):
            check_conn_id(_given(conn_id), conn_ids, what)
        if _given(self.sink):
            check_sink(self.sink, sink_options(self.sink_options), roots, conn_ids)

    def execute(self, context: Any) -> list[dict[str, Any]]:
        self._check_allowed()
        partition = resolve_partition(context, self.partition)
        root = _given(self.staging_root) or str(batch_infer_home() / "staging")
        root = storage.location(root, _given(self.staging_conn_id))
        run_dir = run_directory(root, self.dag_id, partition, context["run_id"])
        max_chunks = conf.getint("core", "max_map_length", fallback=1024)
        source = self._source()
        parallel = self.parallel_tasks or parallel_infer_tasks(self.workers_share_host)
        manifest = stage_source(
            source,
            run_dir,
            chunk_rows=_given(self.chunk_rows) or "auto",
            columns=self.columns or None,
            row_id_column=as_optional_str(self.row_id_column),
            max_chunks=max_chunks,
            snapshot=_given(self.snapshot) or "reference",
            parallel_tasks=parallel,
            run={"dag_id": self.dag_id, "run_id": context["run_id"], "partition": partition},
        )
        if not manifest.chunks:
            raise ValueError(f"The input {source.description} has no rows: nothing to score.")
        self.log.info(
            "Staged %s rows from %s (%s) into %d chunk(s) of about %s rows (%d infer tasks at once) under "
            "%s (partition %s)",
            f"{manifest.total_rows:,}",
            source.description,
            f"{len(manifest.files)} file(s) pinned, nothing copied"
            if manifest.snapshot == "reference"
            else "rows copied into chunk files",
            len(manifest.chunks),
            f"{manifest.chunk_rows:,}",
            parallel,
            run_dir,
            partition,
        )
        return [chunk.to_dict() for chunk in manifest.chunks]
