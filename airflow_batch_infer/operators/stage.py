"""StageInputsOperator: snapshot the input (Parquet files or a SQL query) as chunks and a manifest."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, conf
from airflow.sdk.exceptions import AirflowSkipException

from airflow_batch_infer import storage
from airflow_batch_infer.allowlist import check_conn_id, check_locations, check_sink
from airflow_batch_infer.partition import resolve_partition
from airflow_batch_infer.paths import batch_infer_home
from airflow_batch_infer.sinks import sink_options
from airflow_batch_infer.slot_release import release_slot_at_exit
from airflow_batch_infer.sql_options import check_export_parallelism, check_split_column
from airflow_batch_infer.staging import SNAPSHOTS, run_directory, stage_source
from airflow_batch_infer.templated import as_optional_str

if TYPE_CHECKING:
    import pyarrow as pa

    from airflow_batch_infer.sources import Source


def _given(value: Any) -> Any:
    """``None`` for values a template rendered empty (``"{{ params.x or '' }}"``)."""
    return None if value in (None, "", "None") else value


def _flag(value: bool | str | None) -> bool:
    """A boolean argument, also as a template rendered it (``"True"``, ``"false"``, ``""``)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


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
    :param filter: for Parquet input, the rows to score: a pyarrow dataset expression or a SQL-like string
        (``"country = 'DE' AND amount > 10"``, :mod:`airflow_batch_infer.row_filter`); the rest are counted.
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
    :param model_name: with ``model_repository`` and ``inputs``: check the column → tensor mapping against
        the model's ``config.pbtxt`` before anything is staged (where the input's columns are known from
        footers; else right after staging), so that a mapping the model cannot take fails the run before
        the server loads (:mod:`airflow_batch_infer.contract_checks`).
    :param model_repository: the model repository (a local folder; others are checked by the infer task).
    :param inputs: input tensor → column(s), as given to the infer task.
    :param outputs: output tensor → column, as given to the infer task.
    :param input_templates: BYTES input tensor → template, as given to the infer task.
    :param input_constants: input tensor → constant, as given to the infer task.
    :param passthrough_columns: input columns copied to the outputs, for the table check.
    :param table: the output table: where it exists (DuckDB, PostgreSQL), its columns must take the outputs'
        (:mod:`airflow_batch_infer.sinks.table_checks`).
    :param limit_rows: stage only the first N rows (templated; empty: all) into the scratch partition
        ``<partition>__limit_<N>``, never the real one (:mod:`airflow_batch_infer.row_limits`).
    :param validate_only: make the checks, stage nothing, and skip the rest of the run (templated).
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
        "filter",
        "sink",
        "sink_options",
        "table",
        "limit_rows",
        "validate_only",
        "row_id_column",
        "model_name",
        "model_repository",
        "inputs",
        "outputs",
    )
    template_ext: Sequence[str] = (".sql",)
    template_fields_renderers = {
        "sql": "sql",
        "sql_parameters": "json",
        "sink_options": "json",
        "columns": "json",
        "inputs": "json",
        "outputs": "json",
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
        filter: str | Any | None = None,
        parallel_tasks: int | None = None,
        workers_share_host: bool = False,
        allowed_roots: list[str] | None = None,
        allowed_conn_ids: list[str] | None = None,
        sink: str | None = None,
        sink_options: dict[str, Any] | str | None = None,
        model_name: str | None = None,
        model_repository: str | None = None,
        inputs: Mapping[str, str | Sequence[str]] | None = None,
        outputs: Mapping[str, str] | None = None,
        input_templates: Mapping[str, str] | None = None,
        input_constants: Mapping[str, Any] | None = None,
        passthrough_columns: Sequence[str] = (),
        table: str | None = None,
        limit_rows: int | str | None = None,
        validate_only: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_name = model_name
        self.model_repository = model_repository
        # Mappings, or their JSON text from a template (read when the checks run).
        self.inputs: Any = inputs if isinstance(inputs, str) or not inputs else dict(inputs)
        self.outputs: Any = outputs if isinstance(outputs, str) or not outputs else dict(outputs)
        self.input_templates = dict(input_templates or {})
        self.input_constants = dict(input_constants or {})
        self.passthrough_columns: Any = (
            passthrough_columns if isinstance(passthrough_columns, str) else list(passthrough_columns)
        )
        self.table = table
        self.limit_rows = limit_rows
        self.validate_only = validate_only
        self.allowed_roots = allowed_roots
        self.allowed_conn_ids = allowed_conn_ids
        self.sink = sink
        self.sink_options = sink_options
        if "{{" not in str(snapshot) and snapshot not in SNAPSHOTS:
            raise ValueError(f"snapshot must be one of {list(SNAPSHOTS)}, got {snapshot!r}.")
        if isinstance(filter, str) and "{{" not in filter and filter.strip():
            from airflow_batch_infer.row_filter import sql_to_expression

            sql_to_expression(filter)  # a syntax error or a part not allowed fails the DAG's parse
        self.snapshot, self.filter = snapshot, filter
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
        # Imported here: Arrow would cost every parse of a DAG file that uses this operator (every task
        # process parses its DAG).
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

    def _check_contract(self, schema: pa.Schema | None, row_id_column: str | None) -> bool:
        """Check the mapping against the model's config, and the outputs against the sink's table; whether
        it could (``False`` when the input's columns or the model's config are not known here).

        :param schema: the input's columns as staged (``None``: not known yet).
        :param row_id_column: the row id column the outputs carry (``None``: a generated ``row_id``).
        """
        if schema is None or not (self.model_name and self.model_repository and self.inputs):
            return False
        from airflow_batch_infer.contract_checks import check_before_start

        return check_before_start(
            schema,
            row_id_column,
            model_name=self.model_name,
            model_repository=self.model_repository,
            inputs=self.inputs,
            outputs=self.outputs,
            input_templates=self.input_templates,
            input_constants=self.input_constants,
            passthrough_columns=self.passthrough_columns,
            table=self.table if _given(self.table) else None,
            sink=self.sink if _given(self.sink) else None,
            sink_options=sink_options(self.sink_options) if _given(self.sink) else {},
            log=self.log,
        )

    def execute(self, context: Any) -> list[dict[str, Any]]:
        release_slot_at_exit()
        from airflow_batch_infer.row_limits import LimitedSource, limit_pinned, row_limit, scratch_partition

        self._check_allowed()
        partition = resolve_partition(context, self.partition)
        limit = row_limit(self.limit_rows)
        if limit:
            partition = scratch_partition(partition, limit)
            self.log.info("limit_rows=%d: a smoke run into the scratch partition %s.", limit, partition)
        if "ti" in context:
            context["ti"].xcom_push(key="partition", value=partition)
        source = self._source()
        from airflow_batch_infer.contract_checks import staged_schema

        checked = self._check_contract(
            staged_schema(source, self.columns, self.row_id_column), self.row_id_column
        )
        if _flag(self.validate_only):
            if not checked and self.model_name and self.inputs:
                with source.open(self.columns or None) as reader:  # a query's columns: run it, read none
                    checked = self._check_contract(reader.schema, self.row_id_column)
            raise AirflowSkipException(
                "validate_only: the checks passed"
                + ("" if checked else " (no mapping or model config to check here)")
                + "; nothing staged, and the run stops here: no server start, inference or persist."
            )
        root = _given(self.staging_root) or str(batch_infer_home() / "staging")
        root = storage.location(root, _given(self.staging_conn_id))
        run_dir = run_directory(root, self.dag_id, partition, context["run_id"])
        max_chunks = conf.getint("core", "max_map_length", fallback=1024)
        parallel = self.parallel_tasks or parallel_infer_tasks(self.workers_share_host)
        snapshot = _given(self.snapshot) or "reference"
        by_reference = snapshot == "reference" and _given(self.source) is not None
        chunk_rows = _given(self.chunk_rows) or "auto"
        manifest = stage_source(
            LimitedSource(source, limit) if limit and not by_reference else source,
            run_dir,
            chunk_rows=chunk_rows,
            columns=self.columns or None,
            row_id_column=as_optional_str(self.row_id_column),
            max_chunks=max_chunks,
            snapshot=snapshot,
            parallel_tasks=parallel,
            run={"dag_id": self.dag_id, "run_id": context["run_id"], "partition": partition},
            row_filter=self.filter,
        )
        if limit and by_reference:
            manifest = limit_pinned(manifest, limit, chunk_rows, max_chunks, parallel)
        if not manifest.chunks:
            kept = f" that filter={manifest.row_filter['text']!r} keeps" if manifest.row_filter else ""
            raise ValueError(f"The input {source.description} has no rows{kept}: nothing to score.")
        if not checked and manifest.snapshot == "copy":
            from airflow_batch_infer.parquet_files import open_parquet

            self._check_contract(open_parquet(manifest.chunks[0].path).schema_arrow, self.row_id_column)
        self._staged = manifest  # for get_openlineage_facets_on_complete
        pinned = f"{len(manifest.files)} file(s) pinned, nothing copied"
        text = (manifest.row_filter or {}).get("text")
        filtered = f"{manifest.filtered_rows:,} rows filtered out by {text!r}; " if text else ""
        self.log.info(
            "Staged %s rows from %s (%s%s) into %d chunk(s) of about %s rows (%d infer tasks at once) under "
            "%s (partition %s)",
            f"{manifest.total_rows:,}",
            source.description if not limit else f"the first {limit:,} rows of {source.description}",
            filtered,
            pinned if manifest.snapshot == "reference" else "rows copied into chunk files",
            *(len(manifest.chunks), f"{manifest.chunk_rows:,}", parallel, run_dir, partition),
        )
        return [chunk.to_dict() for chunk in manifest.chunks]

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: the input (files, folders or the query's tables) → the snapshot, with schema and rows.

        :param task_instance: the finished task instance (unused: the manifest staged is kept).
        """
        from airflow_batch_infer.lineage import stage_lineage

        sources = _given(self.source)
        sources = [sources] if isinstance(sources, str) else list(sources or [])
        return stage_lineage(
            self._staged,
            [storage.location(s, _given(self.source_conn_id)) for s in sources],
            _given(self.sql),
            _given(self.sql_conn_id),
            _given(self.sql_database),
        )
