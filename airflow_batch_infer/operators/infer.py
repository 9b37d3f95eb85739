"""TritonInferenceOperator: score one staged chunk through Triton; mapped once per chunk."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_batch_infer.chunk_servers import ChunkServers
from airflow_batch_infer.client.output_mapping import OutputTarget, check_output_mapping
from airflow_batch_infer.errors import ContractError, SourceChangedError, UnknownModelError
from airflow_batch_infer.hooks.triton import TritonHook
from airflow_batch_infer.runtimes.access import server_headers
from airflow_batch_infer.runtimes.fleet import fleet_servers
from airflow_batch_infer.runtimes.lease import keep_renewed
from airflow_batch_infer.runtimes.statistics import gpu_utilization, model_snapshot
from airflow_batch_infer.sinks import PARTS_ARE_THE_TABLE
from airflow_batch_infer.slot_release import release_slot_at_exit
from airflow_batch_infer.staging import ChunkDescriptor, Manifest, output_part_path, rejects_part_path
from airflow_batch_infer.templated import as_list, as_mapping

if TYPE_CHECKING:  # the client (numpy, Arrow, gRPC) is imported where a chunk streams, not by the DAG's parse
    from airflow_batch_infer.chunk_input import ChunkInput


class TritonInferenceOperator(BaseOperator):
    """Stream one chunk through a Triton model and write its output part and rejects part.

    Before any row is sent, the model's metadata is read from the server and the column → tensor
    mapping is checked (names, datatypes, widths). Rows with a null, NaN or infinite input, or that the
    server refuses as invalid, go to the rejects part with a reason. A retry of the task rewrites the
    chunk's parts; nothing else.

    :param chunk: a chunk descriptor from :class:`StageInputsOperator` (the value mapped over).
    :param model_name: the model to call.
    :param inputs: input tensor → column, or list of scalar columns stacked into one tensor; templated, a
        mapping or its JSON text (``"{{ params.inputs | tojson }}"``).
    :param outputs: output tensor → output column (every output under its own name when ``None``), or a
        list of columns, one per value of the tensor (``["p_benign", "p_malignant"]``), or value position →
        column for chosen values only (``{1: "p_malignant"}``); templated, like ``inputs``. Checked when the
        DAG is parsed (when not a template), and against the model's widths before any row is sent.
    :param top_k: the k most likely class labels, as columns ``label`` and ``label_score`` (k = 1) or
        ``label_1``…``label_k`` and ``label_score_1``…, from the output whose config names a
        ``label_filename`` (Triton's classification extension); 0 for none.
    :param postprocess: a function pandas DataFrame → DataFrame applied to each row group of the output
        part before it is written (argmax, thresholds, label maps); it must keep every row and the row id.
    :param server: the start task's return value (its ``grpc_url`` is used), or a ``host:port``; when
        ``None`` the ``triton_conn_id`` connection gives the endpoint.
    :param triton_conn_id: connection of type ``triton`` (TLS, headers; endpoint when ``server`` is None).
    :param model_version: version to call; ``""`` lets the server choose.
    :param passthrough_columns: input columns copied to the output next to the row id (templated: a list or
        its JSON text); ``"*"`` copies every column that no input tensor reads (SageMaker's
        ``JoinSource=Input``).
    :param request_rows: rows per gRPC request (default: from the model's preferred batch sizes).
    :param max_in_flight: requests outstanding (default: 2 per model instance: one executing, one queued).
    :param request_timeout: seconds per request before it counts as a transient failure.
    :param retry_attempts: attempts per request on transient failures (server away, overloaded).
    :param progress_interval: seconds between progress lines in the log.
    :param shared_memory: pass tensors through Triton system shared memory: ``auto`` (when the server is
        on this host), ``on`` or ``off``.
    :param transport: ``stream`` (requests on one bidirectional gRPC stream) or ``unary`` (a call each).
    :param input_templates: BYTES input tensor → ``str.format`` template over the row's columns (a prompt).
    :param input_constants: input tensor → one value sent with every row (a generation parameter).
    :param token_count_output: output tensor counting generated tokens; tokens/s is then logged too.
    :param compress_parts: Snappy on the parts' integer and text columns; ``None`` (the default) compresses
        parts on object storage and not those on local disk, read once by the persist task, unless ``sink``
        says otherwise.
    :param sink: the sink that will persist the parts, if known (templated): for ``s3_parquet`` and
        ``athena``, whose tables are the part files themselves, parts are compressed wherever they are.
    :param runtime_options: the start task's runtime options, with which a container server's lease is
        renewed (a local server needs none).
    :param lease_renew_interval: seconds between renewals of the server's lease while the chunk streams
        (when ``server`` is a start task's return value), so that its keeper lets it live.
    """

    template_fields: Sequence[str] = (
        "chunk",
        "server",
        "model_name",
        "model_version",
        "request_rows",
        "max_in_flight",
        "shared_memory",
        "transport",
        "sink",
        "inputs",
        "outputs",
        "passthrough_columns",
    )
    template_fields_renderers = {"inputs": "json", "outputs": "json", "passthrough_columns": "json"}
    ui_color = "#d6f5c9"

    def __init__(
        self,
        *,
        chunk: dict[str, Any],
        model_name: str,
        inputs: Mapping[str, str | Sequence[str]] | str,
        outputs: Mapping[str, OutputTarget] | str | None = None,
        server: dict[str, Any] | str | None = None,
        triton_conn_id: str = TritonHook.default_conn_name,
        model_version: str = "",
        passthrough_columns: Sequence[str] | str = (),
        top_k: int = 0,
        postprocess: Callable[[Any], Any] | None = None,
        request_rows: int | str | None = None,
        max_in_flight: int | str | None = None,
        request_timeout: float = 120.0,
        retry_attempts: int = 6,
        progress_interval: float = 10.0,
        shared_memory: str = "auto",
        transport: str = "stream",
        input_templates: Mapping[str, str] | None = None,
        input_constants: Mapping[str, Any] | None = None,
        token_count_output: str | None = None,
        compress_parts: bool | None = None,
        sink: str | None = None,
        runtime_options: dict[str, Any] | None = None,
        lease_renew_interval: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.chunk = chunk
        self.model_name = model_name
        self.inputs: Any = inputs if isinstance(inputs, str) else dict(inputs)
        if not isinstance(outputs, str):
            check_output_mapping(outputs)  # its shape, when the DAG is parsed; widths need the model
        self.outputs: Any = outputs if isinstance(outputs, str) or not outputs else dict(outputs)
        self.server = server
        self.triton_conn_id = triton_conn_id
        self.model_version = model_version
        self.passthrough_columns: Any = (
            passthrough_columns if isinstance(passthrough_columns, str) else list(passthrough_columns)
        )
        if int(top_k) < 0:
            raise ValueError(f"top_k must be 0 (no labels) or a positive number of labels, not {top_k}.")
        if postprocess is not None and not callable(postprocess):
            raise ValueError(f"postprocess must be a function DataFrame → DataFrame, not {postprocess!r}.")
        self.top_k = int(top_k)
        self.postprocess = postprocess
        self.request_rows = request_rows
        self.max_in_flight = max_in_flight
        self.request_timeout = request_timeout
        self.retry_attempts = retry_attempts
        self.progress_interval = progress_interval
        self.shared_memory = shared_memory
        self.transport = transport
        self.input_templates = dict(input_templates or {})
        self.input_constants = dict(input_constants or {})
        self.token_count_output = token_count_output
        self.compress_parts = compress_parts
        self.sink = sink
        self.runtime_options = runtime_options
        self.lease_renew_interval = lease_renew_interval

    def parts_compressed(self) -> bool | None:
        """Whether to compress the parts: as asked, else yes for a sink whose table is the parts, else
        ``None`` (by where they are written)."""
        if self.compress_parts is not None:
            return self.compress_parts
        return True if self.sink in PARTS_ARE_THE_TABLE else None

    def _lease_renewed(self) -> AbstractContextManager[None]:
        """While the chunk streams, the leases of the servers that a start task returned are kept renewed."""
        if fleet_servers(self.server):
            return keep_renewed(dict(self.server), self.runtime_options, self.lease_renew_interval)
        return nullcontext()

    def _model_contract(
        self, hook: TritonHook, servers: ChunkServers
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read the model's metadata and config, with errors that say what to do."""
        from tritonclient.utils import InferenceServerException

        if not hook.is_server_ready():
            raise RuntimeError(
                f"The Triton server at {hook.url} is not reachable or not ready. Check the start task's "
                "log (the server may have exited) or the connection's host and port."
            )
        try:
            metadata = hook.get_model_metadata(self.model_name, self.model_version)
            config = hook.get_model_config(self.model_name, self.model_version)
        except InferenceServerException as error:
            server = servers.serving(hook)  # its repository index is restricted to the holders of its key
            headers = server_headers(server) if server else {}
            index = hook.get_conn().get_model_repository_index(headers=headers, as_json=True)
            known = sorted({m["name"] for m in index.get("models", [])})
            raise UnknownModelError(
                f"Model {self.model_name!r} (version {self.model_version or 'latest'}) is not available on "
                f"the Triton server at {hook.url}: {error.message()}. Models in its repository: {known}."
            ) from error
        return metadata, config

    def resolve_templated(self) -> None:
        """Read the rendered ``inputs``, ``outputs`` and ``passthrough_columns`` (JSON text, from a template)
        or as given."""
        self.inputs = as_mapping(self.inputs, "inputs")
        self.outputs = as_mapping(self.outputs, "outputs") or None
        check_output_mapping(self.outputs)
        if self.passthrough_columns != "*":  # every column that is not a model input
            self.passthrough_columns = as_list(self.passthrough_columns, "passthrough_columns")

    def prepare_for_model(self, metadata: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """Adapt settings to the served model before the mapping is checked; a hook for subclasses.

        :param metadata: the server's model metadata (inputs and outputs: names, datatypes, shapes).
        :param config: the model's configuration as loaded (``max_batch_size``, batching, instances).
        """

    @staticmethod
    def _open_chunk(descriptor: ChunkDescriptor, manifest: Manifest) -> ChunkInput:
        """The chunk to score; a pinned input file that changed since staging fails the task for good (a
        retry would find the same file)."""
        from airflow_batch_infer.chunk_input import open_chunk

        try:
            return open_chunk(descriptor, manifest)
        except SourceChangedError as error:
            raise AirflowFailException(str(error)) from error

    def _passthrough(self, columns: Sequence[str], inputs: Sequence[Any]) -> list[str]:
        """The input columns copied to the outputs: as named, or for ``"*"`` every one no input reads."""
        if self.passthrough_columns != "*":
            return list(self.passthrough_columns)
        read = {column for binding in inputs for column in binding.columns}
        return [c for c in columns if c not in read]

    def execute(self, context: Any) -> dict[str, Any]:
        release_slot_at_exit()
        from airflow_batch_infer.client.part_writer import PostprocessError
        from airflow_batch_infer.client.retry import RetryPolicy
        from airflow_batch_infer.client.sizing import resolve_sizes
        from airflow_batch_infer.client.streaming import ChunkStreamer, ServerUnavailableError, StreamSettings
        from airflow_batch_infer.client.tensors import bind_inputs, bind_outputs

        try:
            self.resolve_templated()
        except ValueError as error:  # bad input: a retry renders the same text
            raise AirflowFailException(str(error)) from error
        descriptor = ChunkDescriptor.from_dict(self.chunk)
        manifest = Manifest.load(descriptor.run_dir)
        chunk = self._open_chunk(descriptor, manifest)
        servers = ChunkServers(self.server, self.triton_conn_id, descriptor.index, self.log)
        candidates = servers.candidates
        hook, position = servers.ready_hook()
        try:
            metadata, config = self._model_contract(hook, servers)
        except BaseException:
            hook.close()
            raise
        self.prepare_for_model(metadata, config)
        max_batch = int(config.get("max_batch_size") or 0)
        optional = [i["name"] for i in config.get("input", []) if i.get("optional")]
        inputs = bind_inputs(
            self.inputs,
            chunk.schema,
            metadata,
            max_batch,
            templates=self.input_templates,
            constants=self.input_constants,
            optional=optional,
        )
        labelled = [o["name"] for o in config.get("output", []) if o.get("label_filename")]
        outputs = bind_outputs(self.outputs, metadata, max_batch, top_k=self.top_k, labelled_outputs=labelled)
        if self.token_count_output and self.token_count_output not in {b.tensor for b in outputs}:
            raise ContractError(
                f"token_count_output={self.token_count_output!r} is not among the outputs requested: "
                f"{[b.tensor for b in outputs]}."
            )
        request_rows, in_flight = resolve_sizes(config, self.request_rows, self.max_in_flight)
        settings = StreamSettings(
            model_name=self.model_name,
            model_version=self.model_version,
            request_rows=request_rows,
            max_in_flight=in_flight,
            request_timeout=self.request_timeout,
            retry=RetryPolicy(max_attempts=self.retry_attempts),
            progress_interval=self.progress_interval,
            shared_memory=self.shared_memory,
            transport=self.transport,
            token_count_output=self.token_count_output,
        )
        moved_from: list[str] = []
        first = model_snapshot(hook, self.model_name)  # Triton's counters, for the run report
        with self._lease_renewed():
            while True:
                server = candidates[position]
                self.log.info(
                    "Chunk %d: %s rows from %s to model %r at %s%s, %d rows a request, %d requests in flight",
                    descriptor.index,
                    f"{descriptor.rows:,}",
                    chunk.description,
                    self.model_name,
                    hook.url,
                    f" (server {server.handle.get('server_id')})" if server else "",
                    request_rows,
                    in_flight,
                )
                streamer = ChunkStreamer(
                    inputs=inputs,
                    outputs=outputs,
                    settings=settings,
                    row_id_column=manifest.row_id_column,
                    passthrough_columns=self._passthrough(chunk.schema.names, inputs),
                    client_factory=hook.get_async_client,
                    url=hook.url,
                    headers={**(hook.headers or {}), **(server_headers(server) if server else {})},
                    logger=self.log,
                    compress_parts=self.parts_compressed(),
                    postprocess=self.postprocess,
                )
                try:
                    result = streamer.run(
                        chunk,
                        output_part_path(descriptor.run_dir, descriptor.index),
                        rejects_part_path(descriptor.run_dir, descriptor.index),
                        descriptor.index,
                    )
                    break
                except PostprocessError as error:
                    raise AirflowFailException(str(error)) from error  # the same rows fail it again
                except ServerUnavailableError as error:
                    hook.close()
                    if position + 1 == len(candidates):
                        raise
                    self.log.warning(
                        "Chunk %d moves from Triton server %s (%s) to the run's next server: %s",
                        descriptor.index,
                        server.handle.get("server_id") if server else "-",
                        hook.url,
                        error,
                    )
                    moved_from.append(str(server.handle.get("server_id")) if server else hook.url)
                    hook, position = servers.ready_hook(position + 1)
                    first = None  # counters of another server
        last = model_snapshot(hook, self.model_name, settled=first, requests=result.requests)
        hook.close()
        self._scored = (manifest, hook.url, metadata, result)  # for get_openlineage_facets_on_complete
        self.log.info(
            "Chunk %d done: %s rows scored, %s set aside, %.1f s, %s rows/s (tensors via %s) on server %s; "
            "outputs in %s",
            result.index,
            f"{result.rows_out:,}",
            f"{result.rows_rejected:,}",
            result.seconds,
            f"{result.rows_per_second:,.0f}",
            "shared memory" if result.shared_memory else "gRPC",
            server.handle.get("server_id") if server else hook.url,
            result.output_path,
        )
        return result.to_dict() | {
            "server": server.handle.get("server_id") if server else hook.url,
            "moved_from": moved_from,
            "filtered_rows": chunk.filtered_rows,
            "statistics": [first, last],
            "gpu_utilization": gpu_utilization(server.metrics_url) if server else None,
        }

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: the snapshot and the served model (name, version, tensors) → the chunk's parts.

        :param task_instance: the finished task instance (unused: what the chunk did is kept).
        """
        from airflow_batch_infer.lineage import infer_lineage, served_model_dataset

        manifest, url, metadata, result = self._scored
        model = served_model_dataset(url, self.model_name, metadata)
        return infer_lineage(
            manifest, model, result.output_path, result.rows_out, result.rejects_path, result.rows_rejected
        )
