"""batch_inference(...): the whole pipeline as one TaskGroup, to drop into an existing DAG after its ETL."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import TaskGroup

from airflow_batch_infer.client.output_mapping import OutputTarget, check_output_mapping
from airflow_batch_infer.config import get_setting
from airflow_batch_infer.hooks.triton import TritonHook
from airflow_batch_infer.operators.infer import TritonInferenceOperator
from airflow_batch_infer.operators.persist import PersistOutputsOperator
from airflow_batch_infer.operators.report import RunReportOperator
from airflow_batch_infer.operators.server import StartTritonServerOperator, StopTritonServerOperator
from airflow_batch_infer.operators.stage import StageInputsOperator

#: ``runtime=`` value that stands for ``[batch_infer] default_runtime``.
DEFAULT_RUNTIME = "default"


def batch_inference(
    *,
    model_name: str,
    inputs: Mapping[str, str | Sequence[str]] | str,
    table: str,
    model_repository: str | Path | None = None,
    outputs: Mapping[str, OutputTarget] | str | None = None,
    group_id: str = "batch_inference",
    runtime: str | None = DEFAULT_RUNTIME,
    runtime_options: dict[str, Any] | None = None,
    triton_conn_id: str = TritonHook.default_conn_name,
    partition: str | None = None,
    staging_root: str | None = None,
    chunk_rows: int | str = "auto",
    snapshot: str = "reference",
    filter: str | Any | None = None,
    columns: list[str] | None = None,
    row_id_column: str | None = None,
    passthrough_columns: Sequence[str] | str = (),
    top_k: int = 0,
    postprocess: Callable[[Any], Any] | None = None,
    request_rows: int | str | None = None,
    max_in_flight: int | str | None = None,
    sink: str = "duckdb",
    sink_options: dict[str, Any] | None = None,
    max_rejected_fraction: float | str | None = None,
    infer_retries: int = 2,
    infer_options: dict[str, Any] | None = None,
    infer_operator: type[TritonInferenceOperator] = TritonInferenceOperator,
    source: str | list[str] | None = None,
    source_conn_id: str | None = None,
    sql: str | None = None,
    sql_conn_id: str | None = None,
    sql_parameters: dict[str, Any] | list[Any] | None = None,
    sql_database: str | None = None,
    sql_split_column: str | None = None,
    sql_export_parallelism: int | str | None = None,
    staging_conn_id: str | None = None,
    start_options: dict[str, Any] | None = None,
    lease_timeout: float | None = None,
    servers: int | str = 1,
    min_ready: int | None = None,
    allowed_roots: list[str] | None = None,
    allowed_conn_ids: list[str] | None = None,
    limit_rows: int | str | None = None,
    validate_only: bool | str = False,
) -> TaskGroup:
    """Build stage + start server (setup) → infer (mapped per chunk) → persist, and stop server (teardown).

    The server stops as soon as every chunk is scored, and also when inference fails. Templated
    arguments (``source``, ``partition``, ``chunk_rows``, ``request_rows``, ``inputs``, ``outputs``,
    ``passthrough_columns``, ``row_id_column``, ``max_rejected_fraction``, ...) may use Jinja, such as
    ``"{{ params.partition }}"``; a mapping or list from a Param is passed as its JSON text,
    ``"{{ params.inputs | tojson }}"``.

    :param model_name: the Triton model to call.
    :param inputs: input tensor → column, or list of scalar columns stacked into one tensor.
    :param table: warehouse table for the outputs (rows set aside go to ``<table>_rejects``).
    :param model_repository: the Triton model repository (needed when a runtime starts the server).
    :param outputs: output tensor → output column (all outputs under their own names when ``None``), a list
        of columns (one per value of the tensor) or ``{value position: column}`` (chosen values only).
    :param group_id: the TaskGroup's id.
    :param runtime: where the job's own server runs (``local``, ``docker``, ``kubernetes``, ``ecs``, a
        site's own by entry point name or ``"module:Class"``); ``"default"`` (the default) is
        ``[batch_infer] default_runtime`` (``local`` unless configured), read when the DAG is parsed;
        ``None`` uses a server that runs anyway, at the ``triton_conn_id`` connection's address, with no
        start and stop tasks.
    :param runtime_options: keyword options of the runtime.
    :param triton_conn_id: ``triton`` connection for TLS and headers.
    :param partition: the run's partition key (default: from the run's dates).
    :param staging_root: root folder of run snapshots.
    :param chunk_rows: rows per chunk (one mapped infer task each); ``"auto"`` makes one chunk per infer
        task that can run at once (see :class:`StageInputsOperator`).
    :param snapshot: ``"reference"`` (pin the Parquet input, copy nothing) or ``"copy"`` (chunk files, for
        an ETL that rewrites its files in place); SQL input is always copied.
    :param filter: for Parquet input, the rows to score: a pyarrow dataset expression or a SQL-like string
        (``"country = 'DE'"``); the rows it leaves out are counted, neither scored nor set aside.
    :param columns: input columns to stage (all when ``None``).
    :param row_id_column: the input's own unique row id (a ``row_id`` column is added when ``None``).
    :param passthrough_columns: input columns copied to the output table; ``"*"`` for every column that
        no input tensor reads.
    :param top_k: the k most likely class labels as columns (``label``, ``label_score``), from the output
        whose config names a ``label_filename``; 0 for none.
    :param postprocess: pandas DataFrame → DataFrame applied to the outputs in the infer tasks (argmax,
        thresholds, label maps); it keeps every row and the row id column.
    :param request_rows: rows per gRPC request (default from the model config).
    :param max_in_flight: requests outstanding per task (default from the model config).
    :param sink: warehouse kind (``duckdb``, ``postgres``, ``s3_parquet``, ``redshift``, ``athena``,
        ``iceberg``, or a site's own by entry point name or ``"module:Class"``). For ``s3_parquet`` and
        ``athena``, whose tables are the part files, parts are compressed wherever they are written.
    :param sink_options: keyword options of the sink.
    :param max_rejected_fraction: fail the run, writing nothing, when more rows than this were set aside.
    :param infer_retries: Airflow retries of each infer task (each rewrites only its chunk).
    :param infer_options: further keyword arguments of the infer operator.
    :param source: Parquet file or folder to score, local or ``s3://conn@bucket/prefix`` (give ``source``
        or ``sql``).
    :param source_conn_id: connection for a ``source`` on object storage.
    :param sql: a query (or ``.sql`` file) whose rows are snapshotted and scored.
    :param sql_conn_id: a common-sql connection for ``sql`` (the embedded DuckDB file when ``None``).
    :param sql_parameters: parameters of the query.
    :param sql_database: database (schema) for the query, when the connection has several.
    :param sql_split_column: integer column whose ranges a PostgreSQL query is exported in, in parallel
        (default: ``row_id_column`` when it is an integer; see :class:`StageInputsOperator`).
    :param sql_export_parallelism: connections exporting ranges at once; ``1``: one stream.
    :param staging_conn_id: connection for a ``staging_root`` on object storage.
    :param start_options: further keyword arguments of the start task (``deferrable``, ``poll_interval``).
    :param lease_timeout: seconds the server may go without a lease renewal before its keeper or the
        reaper stops it (default: the runtime's, 30 minutes); the infer tasks renew it while they stream.
        It must outlast the run's longest gap without a streaming infer task (a stage running beside the
        start, infer tasks queued for a slot).
    :param servers: how many Triton servers the run starts, each with its own endpoint, or ``"auto"``
        (one per visible GPU with the local and docker runtimes); the infer tasks spread their chunks over
        them (round robin by chunk) and move a chunk to another server when its own stays unavailable.
    :param min_ready: how many servers must be ready before the infer tasks start (default: all).
    :param allowed_roots: when given, every location a run reads or writes (the source, the staging root,
        the sink's paths) must lie under one of these, whatever a run's Params say; checked by the stage task
        before anything is staged, and by persist.
    :param allowed_conn_ids: when given, every connection a run names must be one of these.
    :param limit_rows: a smoke run: score only the first N rows (templated; empty: all), into the scratch
        partition ``<partition>__limit_<N>``; the real partition is never touched.
    :param validate_only: make the run's checks (the mapping against the model's config.pbtxt, the sink's
        table against the outputs) and skip the rest: no server start, inference or persist (templated).
    :param infer_operator: the mapped infer operator: :class:`TritonInferenceOperator`, or a subclass
        such as ``TritonGenerateOperator`` for LLM generation.
    """
    if runtime == DEFAULT_RUNTIME:
        runtime = get_setting("default_runtime") or "local"
    if runtime is not None and model_repository is None:
        raise ValueError("batch_inference needs model_repository when a runtime starts the server.")
    # A mapped task's arguments reach its operator only when it runs: check them now, when the DAG is parsed.
    if not isinstance(outputs, str):  # a template's text is checked by the infer task, once rendered
        check_output_mapping(outputs)
    if (
        isinstance(passthrough_columns, str)
        and passthrough_columns != "*"
        and "{{" not in passthrough_columns
    ):
        raise ValueError(
            f"passthrough_columns={passthrough_columns!r}: give a list of columns (or a template of its JSON "
            "text), or '*'."
        )
    if postprocess is not None and not callable(postprocess):
        raise ValueError(f"postprocess must be a function DataFrame → DataFrame, not {postprocess!r}.")
    with TaskGroup(group_id=group_id) as group:
        stage = StageInputsOperator(
            task_id="stage",
            source=source,
            source_conn_id=source_conn_id,
            sql=sql,
            sql_conn_id=sql_conn_id,
            sql_parameters=sql_parameters,
            sql_database=sql_database,
            sql_split_column=sql_split_column,
            sql_export_parallelism=sql_export_parallelism,
            staging_root=staging_root,
            staging_conn_id=staging_conn_id,
            chunk_rows=chunk_rows,
            columns=columns,
            row_id_column=row_id_column,
            partition=partition,
            snapshot=snapshot,
            filter=filter,
            workers_share_host=runtime == "local",
            allowed_roots=allowed_roots,
            allowed_conn_ids=allowed_conn_ids,
            sink=sink,
            sink_options=sink_options,
            limit_rows=limit_rows,
            validate_only=validate_only,
            table=table,
            passthrough_columns=passthrough_columns,
            **_contract(infer_operator, model_name, model_repository, inputs, outputs, infer_options),
        )
        start = None
        if runtime is not None:
            start = StartTritonServerOperator(
                task_id="start_server",
                model_repository=str(model_repository),
                models=[model_name],
                runtime=runtime,
                runtime_options=runtime_options,
                servers=servers,
                min_ready=min_ready,
                validate_only=validate_only,
                **({"lease_timeout": lease_timeout} if lease_timeout is not None else {}),
                **(start_options or {}),
            )
        infer = infer_operator.partial(
            task_id="infer",
            server=start.output if start else None,
            model_name=model_name,
            inputs=inputs,
            outputs=outputs,
            triton_conn_id=triton_conn_id,
            passthrough_columns=passthrough_columns,
            **({"top_k": top_k} if top_k else {}),
            **({"postprocess": postprocess} if postprocess is not None else {}),
            request_rows=request_rows,
            max_in_flight=max_in_flight,
            retries=infer_retries,
            map_index_template="chunk {{ task.chunk['index'] }}",
            sink=sink,  # the parts of a sink whose table is the parts are compressed wherever they are
            runtime_options=runtime_options,  # to renew a container server's lease
            **(infer_options or {}),
        ).expand(chunk=stage.output)
        persist = PersistOutputsOperator(
            task_id="persist",
            chunks=stage.output,
            results=infer.output,
            table=table,
            sink=sink,
            sink_options=sink_options,
            # A run limited to N rows persists the scratch partition that its stage task staged.
            partition=partition
            if limit_rows is None
            else f"{{{{ ti.xcom_pull(task_ids='{stage.task_id}', key='partition') }}}}",
            max_rejected_fraction=max_rejected_fraction,
            allowed_roots=allowed_roots,
            allowed_conn_ids=allowed_conn_ids,
            write_report=False,  # the report task writes it, once the table is committed
        )
        report = RunReportOperator(
            task_id="report", chunks=stage.output, results=infer.output, persisted=persist.output
        )
        persist >> report
        if start is None:
            stage >> infer >> persist
        else:
            stop = StopTritonServerOperator(
                task_id="stop_server", server=start.output, runtime_options=runtime_options
            )
            [stage, start] >> infer >> [persist, stop]
            stop.as_teardown(setups=start)
    return group


def _contract(
    infer_operator: type[TritonInferenceOperator],
    model_name: str,
    model_repository: str | Path | None,
    inputs: Mapping[str, str | Sequence[str]],
    outputs: Mapping[str, str] | None,
    infer_options: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What the stage task needs to check the mapping against the model's config.pbtxt; nothing for an
    infer operator that adapts the mapping to the served model (``prepare_for_model``, as the LLM one does):
    its infer tasks check it against the server."""
    if infer_operator.prepare_for_model is not TritonInferenceOperator.prepare_for_model:
        return {}
    options = infer_options or {}
    return {
        "model_name": model_name,
        "model_repository": str(model_repository) if model_repository is not None else None,
        "inputs": inputs,
        "outputs": outputs,
        "input_templates": options.get("input_templates"),
        "input_constants": options.get("input_constants"),
    }
