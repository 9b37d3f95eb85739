"""The streaming inference loop: one chunk in, one output part and one rejects part out.

The chunk is read ahead in a thread of its own, a few requests' worth at a time, and encoded there into
tensors (straight into shared memory when the server is on this host); the rows go out as many concurrent
gRPC requests (``max_in_flight``) so that Triton's dynamic batcher always has work queued. Responses are
written in row order, by another thread. Memory holds a few reads, the requests in flight and one row
group being written, whatever the size of the chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from airflow_batch_infer.chunk_input import ChunkInput, StagedChunk
from airflow_batch_infer.client.encoding import encode_batch
from airflow_batch_infer.client.input_binding import InputBinding
from airflow_batch_infer.client.memory_pool import reusing_memory_pool
from airflow_batch_infer.client.output_binding import OutputBinding, output_arrays, output_fields
from airflow_batch_infer.client.part_writer import PartBuffer, Postprocess
from airflow_batch_infer.client.retry import RetryPolicy, error_status, is_bad_input, is_transient
from airflow_batch_infer.client.shared_memory import (
    ReadBuffer,
    SharedMemoryPool,
    Slot,
    server_is_local,
    supports_shared_memory,
)
from airflow_batch_infer.client.stream import InferStream, StreamRequestError
from airflow_batch_infer.client.tensors import TRITON_NUMPY, row_bytes
from airflow_batch_infer.client.timing import LatencyHistogram, ProgressSamples
from airflow_batch_infer.staging import atomic_target, commit
from airflow_batch_infer.storage import discard, is_remote, remove_stale_temps

REASON_COLUMN = "reject_reason"
READ_ROWS = 65_536  # most rows decoded at once from the chunk
READ_BYTES = 16 << 20  # about the most bytes decoded at once (a few requests of long texts)
READ_BUFFERS = 3  # shared memory read buffers: one being encoded, one being sent, one finishing
REORDER_WINDOWS = 4  # completed requests held for row order, in multiples of the requests in flight


class InferenceError(RuntimeError):
    """Inference on a chunk cannot go on (server gone past the retry budget, model error)."""


class ServerUnavailableError(InferenceError):
    """The server stayed unreachable past the retry budget: another server of the run may finish the chunk."""


@dataclass(frozen=True)
class StreamSettings:
    """How a chunk is streamed through the server.

    :param model_name: model to call.
    :param model_version: version to call; ``""`` lets the server choose.
    :param request_rows: rows per gRPC request (at most the model's ``max_batch_size``).
    :param max_in_flight: requests outstanding at once.
    :param request_timeout: seconds one request may take before it counts as a transient failure.
    :param retry: retry policy for transient failures.
    :param progress_interval: seconds between progress lines in the task log.
    :param shared_memory: pass tensors through Triton system shared memory: ``"auto"`` when the server
        is on this host (falling back to gRPC if it cannot map the regions), ``"on"`` or ``"off"``.
    :param transport: ``"stream"`` sends requests on one bidirectional gRPC stream (about half the
        client CPU of unary calls); ``"unary"`` makes one gRPC call per request.
    :param token_count_output: output tensor holding the tokens generated per row (an LLM's
        ``num_output_tokens``); when set, progress lines report tokens/s too.
    """

    model_name: str
    model_version: str = ""
    request_rows: int = 4096
    max_in_flight: int = 8
    request_timeout: float | None = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    progress_interval: float = 10.0
    shared_memory: str = "auto"
    transport: str = "stream"
    token_count_output: str | None = None

    def __post_init__(self) -> None:
        if self.shared_memory not in ("auto", "on", "off"):
            raise ValueError(f"shared_memory must be 'auto', 'on' or 'off', not {self.shared_memory!r}.")
        if self.transport not in ("stream", "unary"):
            raise ValueError(f"transport must be 'stream' or 'unary', not {self.transport!r}.")


@dataclass
class ChunkResult:
    """What one chunk's inference produced; small enough for XCom.

    :param index: chunk number.
    :param rows: rows read from the chunk.
    :param rows_out: rows written to the output part.
    :param rows_rejected: rows set aside in the rejects part.
    :param output_path: the output part file.
    :param rejects_path: the rejects part file.
    :param seconds: wall time of the chunk.
    :param requests: gRPC requests that succeeded.
    :param retries: requests retried after a transient failure.
    :param shared_memory: whether tensors went through system shared memory.
    :param tokens_out: tokens generated, when the settings name a token count output.
    :param started_at: when the chunk started (seconds since the epoch).
    :param latency: request latencies, as :class:`~airflow_batch_infer.client.timing.LatencyHistogram`
        bucket counts.
    :param progress: ``[time, rows done]`` samples
        (:class:`~airflow_batch_infer.client.timing.ProgressSamples`).
    """

    index: int
    rows: int
    rows_out: int
    rows_rejected: int
    output_path: str
    rejects_path: str
    seconds: float
    requests: int = 0
    retries: int = 0
    shared_memory: bool = False
    tokens_out: int = 0
    started_at: float = 0.0
    latency: dict[str, int] = field(default_factory=dict)
    progress: list[list[float]] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows_per_second"] = round(self.rows_per_second, 1)
        return data


@dataclass
class _Piece:
    """The outcome of one request: rows that got outputs, and rows set aside with reasons."""

    kept: pa.RecordBatch
    outputs: dict[str, np.ndarray]
    rejected: pa.RecordBatch
    reasons: list[str]


@dataclass
class _ReadLease:
    """A read buffer held until every request pointing into it is done."""

    pool: SharedMemoryPool
    buffer: ReadBuffer
    pending: int

    def done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.pool.release_read(self.buffer)


@dataclass
class _Request:
    """The rows of one request, encoded: tensors for every row, which rows are good, and why the others
    are not (by position in the request)."""

    batch: pa.RecordBatch
    tensors: dict[str, np.ndarray]
    good: np.ndarray
    reasons: dict[int, str]
    lease: _ReadLease | None = None


class _ChunkReader:
    """The chunk in reads of a few requests' worth, each decoded and encoded at once, then split.

    A large read and one encode per read cost less CPU per row than one of each per request. A read stays
    within ``READ_ROWS`` rows and near ``READ_BYTES`` (long texts, wide tensors); its requests share its
    memory. Reads run one at a time in the reader's own thread, so that their buffers come from, and go
    back to, one thread's share of the memory pool.

    :param chunk: the chunk.
    :param columns: columns to read.
    :param inputs: input bindings.
    :param request_rows: rows per request; a read is a multiple of it.
    """

    def __init__(
        self, chunk: ChunkInput, columns: list[str], inputs: Sequence[InputBinding], request_rows: int
    ) -> None:
        self.inputs = inputs
        self.request_rows = request_rows
        read_row_bytes = max(sum(row_bytes(b) for b in inputs if b.width > 0), chunk.bytes_per_row(columns))
        fit = int(READ_BYTES / read_row_bytes) if read_row_bytes else READ_ROWS
        self.read_rows = max(request_rows, min(READ_ROWS, fit) // request_rows * request_rows)
        self._reads = chunk.iter_batches(self.read_rows, columns)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-read")

    async def read(self, into: Mapping[str, np.ndarray] | None) -> list[_Request] | None:
        """``next`` in the reader's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.next, into)

    def close(self) -> None:
        """Stop the reader's thread, after the read under way if any."""
        self._thread.shutdown(wait=True, cancel_futures=True)

    def next(self, into: Mapping[str, np.ndarray] | None) -> list[_Request] | None:
        """The next read's requests (``None`` at the end); tensors are encoded into ``into`` when given."""
        read = next(self._reads, None)
        if read is None:
            return None
        tensors, good, reasons = encode_batch(read, self.inputs, into)
        size = self.request_rows
        reasons_by_request: list[dict[int, str]] = [{} for _ in range(0, read.num_rows, size)]
        for row, reason in reasons.items():
            reasons_by_request[row // size][row % size] = reason
        requests = []
        for number, start in enumerate(range(0, read.num_rows, size)):
            end = start + size
            requests.append(
                _Request(
                    batch=read.slice(start, size),
                    tensors={name: values[start:end] for name, values in tensors.items()},
                    good=good[start:end],
                    reasons=reasons_by_request[number],
                )
            )
        return requests


class ChunkStreamer:
    """Streams one chunk through a Triton model and writes its output and rejects parts.

    :param inputs: checked input bindings.
    :param outputs: checked output bindings.
    :param settings: request size, concurrency, timeouts and retries.
    :param row_id_column: column identifying each row; copied to outputs and rejects.
    :param passthrough_columns: input columns copied unchanged to the outputs.
    :param client_factory: makes the asyncio gRPC client (inside the event loop).
    :param url: the server's ``host:port``, to tell whether shared memory can be used.
    :param headers: headers sent with every request.
    :param logger: where progress and retries are logged.
    :param compress_parts: Snappy on the parts' integer and text columns; ``None`` decides by where the
        parts go: yes on object storage (bytes over the network and at rest), no on local disk, where a
        part is read once by the persist task and compressing it took two fifths of its write.
    :param postprocess: pandas DataFrame → DataFrame applied to each output row group before it is written
        (argmax, thresholds, label maps); it keeps every row and the row id column.
    """

    def __init__(
        self,
        *,
        inputs: Sequence[InputBinding],
        outputs: Sequence[OutputBinding],
        settings: StreamSettings,
        row_id_column: str,
        passthrough_columns: Sequence[str] = (),
        client_factory: Any,
        url: str | None = None,
        headers: dict[str, str] | None = None,
        logger: logging.Logger | None = None,
        compress_parts: bool | None = None,
        postprocess: Postprocess | None = None,
    ) -> None:
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.settings = settings
        self.row_id_column = row_id_column
        self.passthrough_columns = [c for c in passthrough_columns if c != row_id_column]
        self.client_factory = client_factory
        self.url = url
        self.headers = headers
        self.log = logger or logging.getLogger(__name__)
        self.compress_parts = compress_parts
        self.postprocess = postprocess
        self.requests = 0
        self.retries = 0
        self.tokens_out = 0
        self.latency = LatencyHistogram()
        self.progress = ProgressSamples()
        self._client: aioclient.InferenceServerClient | None = None
        self._pool: SharedMemoryPool | None = None
        self._pool_used = False
        self._infer_stream: InferStream | None = None
        self._server_may_have_restarted = False

    @property
    def input_columns(self) -> list[str]:
        seen: dict[str, None] = {}
        for binding in self.inputs:
            seen.update(dict.fromkeys(binding.columns))
        return list(seen)

    def run(
        self,
        chunk: ChunkInput | str | Path,
        output_path: str | Path,
        rejects_path: str | Path,
        index: int = 0,
    ) -> ChunkResult:
        """Stream ``chunk`` and write both parts atomically (a temporary file, then one rename or one
        upload). Paths may be local or object storage locations (``s3://conn@bucket/key``).

        :param chunk: the chunk (:func:`~airflow_batch_infer.chunk_input.open_chunk`), or a Parquet file.
        :param output_path: final path of the output part.
        :param rejects_path: final path of the rejects part.
        :param index: chunk number, for the log and the result.
        """
        with reusing_memory_pool():
            if not isinstance(chunk, ChunkInput):
                chunk = StagedChunk(chunk)
            return asyncio.run(self._run(chunk, output_path, rejects_path, index))

    async def _run(
        self, chunk: ChunkInput, output_path: str | Path, rejects_path: str | Path, index: int
    ) -> ChunkResult:
        started = time.monotonic()
        total = chunk.num_rows
        needed = [self.row_id_column, *self.passthrough_columns]
        needed += [c for c in self.input_columns if c not in needed]
        chunk_schema = chunk.schema
        missing = [c for c in needed if c not in chunk_schema.names]
        if missing:
            raise InferenceError(f"Chunk {chunk.description} has no column(s) {missing}.")
        # An output part's row id and passthrough columns are REQUIRED where the chunk's are (it held no
        # nulls), and its model outputs always: no definition levels to encode took a quarter of the part's
        # write. Parts of a run may so differ in nullability only; ``sinks.base.parts_schema`` allows that.
        # Rejects parts, rare and small, are nullable throughout.
        keep_fields = [chunk_schema.field(c) for c in [self.row_id_column, *self.passthrough_columns]]
        reject_fields = [chunk_schema.field(c).with_nullable(True) for c in needed]
        out_schema = pa.schema(keep_fields + [f for b in self.outputs for f in output_fields(b)])
        rej_schema = pa.schema([reject_fields[0], pa.field(REASON_COLUMN, pa.string()), *reject_fields[1:]])

        for final in (output_path, rejects_path):
            for stale in remove_stale_temps(final):
                self.log.info("Removed %s, left by an earlier attempt at this chunk.", stale)
        out_tmp, rej_tmp = atomic_target(output_path), atomic_target(rejects_path)
        compress = is_remote(output_path) if self.compress_parts is None else self.compress_parts
        rows_out = rows_rejected = 0
        reader = _ChunkReader(chunk, needed, self.inputs, self.settings.request_rows)
        # The first read decodes while the client connects and registers its shared memory.
        first_read = asyncio.create_task(reader.read(None))
        # One thread encodes and writes both parts' row groups, off the event loop.
        writing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-write")
        out = PartBuffer(
            out_tmp,
            out_schema,
            writing,
            compress=compress,
            postprocess=self.postprocess,
            row_id_column=self.row_id_column,
            chunk=index,
        )
        rej = PartBuffer(rej_tmp, rej_schema, writing, compress=compress)
        try:
            async with self.client_factory() as client, contextlib.AsyncExitStack() as stack:
                self._client = client
                self._pool = await self._open_pool(client, stack, reader.read_rows)
                self._pool_used = self._pool is not None
                # On the way out, the read under way (perhaps encoding into the pool) ends before the pool
                # is unmapped: writing into an unmapped region would crash the task.
                stack.callback(reader.close)
                if self.settings.transport == "stream":
                    self._infer_stream = InferStream(client, self.headers)
                    stack.push_async_callback(self._infer_stream.close)
                rows_out, rows_rejected = await self._stream(
                    reader, first_read, out, rej, out_schema, rej_schema, total, index
                )
            out.close()
            rej.close()
            commit(out_tmp, output_path)
            commit(rej_tmp, rejects_path)
        finally:
            if not first_read.done():
                first_read.cancel()
            elif not first_read.cancelled():
                first_read.exception()  # seen: a failed first read is either raised already or moot
            reader.close()
            writing.shutdown(wait=True, cancel_futures=True)  # before the writers close
            self._client = self._pool = self._infer_stream = None
            out.abort()
            rej.abort()
            for tmp in (out_tmp, rej_tmp):
                discard(tmp)
        return ChunkResult(
            index=index,
            rows=total,
            rows_out=rows_out,
            rows_rejected=rows_rejected,
            output_path=str(output_path),
            rejects_path=str(rejects_path),
            seconds=time.monotonic() - started,
            requests=self.requests,
            retries=self.retries,
            shared_memory=self._pool_used,
            tokens_out=self.tokens_out,
            started_at=self.progress.samples[0][0],
            latency=self.latency.to_dict(),
            progress=self.progress.samples,
        )

    async def _open_pool(
        self, client: aioclient.InferenceServerClient, stack: contextlib.AsyncExitStack, read_rows: int
    ) -> SharedMemoryPool | None:
        """Shared memory for the requests in flight and for reads encoded in place, when asked for and
        possible; else ``None``."""
        mode = self.settings.shared_memory
        if mode == "off" or not supports_shared_memory(self.inputs, self.outputs):
            if mode == "on":
                raise InferenceError(
                    "shared_memory='on' needs fixed-size tensors; this model has BYTES ones."
                )
            return None
        if mode == "auto" and not (self.url and server_is_local(self.url)):
            return None
        pool = SharedMemoryPool(
            client,
            self.inputs,
            self.outputs,
            self.settings.request_rows,
            self.settings.max_in_flight,
            self.headers,
            read_rows=read_rows,
            read_buffers=READ_BUFFERS,
        )
        try:
            return await stack.enter_async_context(pool)
        except (InferenceServerException, OSError) as error:
            if mode == "on":
                raise InferenceError(
                    f"Cannot use system shared memory with the server at {self.url}: {error}"
                ) from error
            self.log.warning(
                "Could not set up system shared memory with the server at %s (%s); sending tensors by gRPC.",
                self.url,
                error,
            )
            return None

    async def _stream(
        self,
        reader: _ChunkReader,
        first_read: asyncio.Task[list[_Request] | None],
        out: PartBuffer,
        rej: PartBuffer,
        out_schema: pa.Schema,
        rej_schema: pa.Schema,
        total: int,
        index: int,
    ) -> tuple[int, int]:
        """Read ahead, keep ``max_in_flight`` requests outstanding, write completed pieces in row order."""
        settings = self.settings
        window = asyncio.Semaphore(settings.max_in_flight)
        # Completed pieces wait here for the one before them: a few windows' worth, so that one slow
        # request (a long generation) does not stop new requests from being sent.
        ordered: asyncio.Queue[asyncio.Task[_Piece] | None] = asyncio.Queue(
            maxsize=REORDER_WINDOWS * settings.max_in_flight
        )

        async def next_read() -> list[_Request] | None:
            """The next read, encoded straight into a free shared memory read buffer when there is a pool."""
            if self._pool is None or not self._pool.read_buffer_count:
                return await reader.read(None)
            buffer = await self._pool.acquire_read()
            try:
                requests = await reader.read(buffer.arrays)
            except BaseException:
                self._pool.release_read(buffer)
                raise
            if not requests:
                self._pool.release_read(buffer)
                return requests
            lease = _ReadLease(self._pool, buffer, len(requests))
            for request in requests:
                request.lease = lease
            return requests

        async def produce() -> None:
            # Decoding and encoding the next read runs in a thread while this one's requests are sent.
            read = first_read
            while True:
                requests = await read
                if requests is None:
                    break
                read = asyncio.create_task(next_read())
                for request in requests:
                    await window.acquire()
                    task = asyncio.create_task(self._infer_batch(request))
                    task.add_done_callback(lambda _t: window.release())
                    await ordered.put(task)
            await ordered.put(None)

        producer = asyncio.create_task(produce())
        started = last_log = time.monotonic()
        try:
            while (task := await ordered.get()) is not None:
                piece = await task
                if settings.token_count_output and piece.kept.num_rows:
                    self.tokens_out += int(piece.outputs[settings.token_count_output].sum())
                if piece.kept.num_rows:
                    arrays = [
                        *piece.kept.columns,
                        *(a for b in self.outputs for a in output_arrays(piece.outputs[b.tensor], b)),
                    ]
                    await out.add(pa.RecordBatch.from_arrays(arrays, schema=out_schema))
                if piece.rejected.num_rows:
                    columns_ = piece.rejected.columns
                    arrays = [columns_[0], pa.array(piece.reasons, type=pa.string()), *columns_[1:]]
                    await rej.add(pa.RecordBatch.from_arrays(arrays, schema=rej_schema))
                self.progress.add(out.rows + rej.rows)
                now = time.monotonic()
                if now - last_log >= settings.progress_interval:
                    last_log = now
                    self._log_progress(index, out.rows + rej.rows, total, rej.rows, now - started)
            await producer
        except BaseException:
            producer.cancel()
            while not ordered.empty():
                leftover = ordered.get_nowait()
                if leftover is not None:
                    leftover.cancel()
            raise
        await out.flush()
        await rej.flush()
        self.progress.add(out.rows + rej.rows, force=True)
        self._log_progress(index, out.rows + rej.rows, total, rej.rows, time.monotonic() - started)
        return out.rows, rej.rows

    def _log_progress(self, index: int, done: int, total: int, rejected: int, seconds: float) -> None:
        seconds = max(seconds, 1e-9)
        share = 100.0 * done / total if total else 100.0
        tokens = f", {self.tokens_out / seconds:,.0f} tokens/s" if self.settings.token_count_output else ""
        self.log.info(
            "chunk %d: %s/%s rows (%.0f%%), %s rows/s%s, %s set aside, %d requests, %d retries",
            index,
            f"{done:,}",
            f"{total:,}",
            share,
            f"{done / seconds:,.0f}",
            tokens,
            f"{rejected:,}",
            self.requests,
            self.retries,
        )

    async def _infer_batch(self, request: _Request) -> _Piece:
        """Send one request's good rows, and sort every row into kept or rejected."""
        batch, tensors, good = request.batch, request.tensors, request.good
        if not request.reasons:  # every bad row has a reason: none means every row is good
            kept_idx = range(batch.num_rows)  # no array of positions per request where every row is good
            rejected = batch.slice(0, 0)
            reject_reasons: list[str] = []
        else:
            kept_idx = np.flatnonzero(good)
            bad_idx = np.flatnonzero(~good)
            rejected = batch.take(pa.array(bad_idx))
            reject_reasons = [request.reasons.get(int(i), "invalid row") for i in bad_idx]
            tensors = {name: values[kept_idx] for name, values in tensors.items()}
        slot = await self._pool.acquire() if self._pool else None
        try:
            outputs, failed = await self._infer_rows(tensors, range(len(kept_idx)), slot)
        finally:
            if slot is not None:
                self._pool.release(slot)
            if request.lease is not None:
                request.lease.done()
        id_and_pass = batch.select([self.row_id_column, *self.passthrough_columns])
        if failed:
            failed_pos = np.array(sorted(failed), dtype=np.int64)
            kept_idx = np.asarray(kept_idx)
            keep_mask = np.ones(len(kept_idx), dtype=bool)
            keep_mask[failed_pos] = False
            extra = batch.take(pa.array(kept_idx[failed_pos]))
            rejected = pa.concat_batches([rejected, extra]) if rejected.num_rows else extra
            reject_reasons += [failed[int(p)] for p in failed_pos]
            kept_idx = kept_idx[keep_mask]  # the outputs hold the rows that succeeded only, already
        kept = id_and_pass if len(kept_idx) == batch.num_rows else id_and_pass.take(pa.array(kept_idx))
        return _Piece(kept=kept, outputs=outputs, rejected=rejected, reasons=reject_reasons)

    async def _infer_rows(
        self,
        tensors: dict[str, np.ndarray],
        positions: Sequence[int],
        slot: Slot | None,
        reregistered: bool = False,
    ) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Infer ``positions`` of ``tensors``; a request refused as bad input is split until the bad rows
        are found. Returns outputs for the rows that succeeded (in order) and, for the others, the reason.
        """
        if len(positions) == 0:
            return self._no_outputs(), {}
        everything = len(positions) == len(next(iter(tensors.values())))
        rows = tensors if everything else {name: values[positions] for name, values in tensors.items()}
        try:
            return await self._request(rows, slot), {}
        except InferenceServerException as error:
            if not is_bad_input(error):
                raise
            if slot is not None and "shared memory" in (error.message() or "").lower():
                # Not the rows' fault: the server restarted and lost the regions. Register them again.
                if reregistered:
                    raise InferenceError(f"The server refuses this job's shared memory: {error}") from error
                self._server_may_have_restarted = True
                return await self._infer_rows(tensors, positions, slot, reregistered=True)
            if len(positions) == 1:
                return self._no_outputs(), {int(positions[0]): f"refused by the server: {error.message()}"}
        half = len(positions) // 2
        left_out, left_failed = await self._infer_rows(tensors, positions[:half], slot)
        right_out, right_failed = await self._infer_rows(tensors, positions[half:], slot)
        merged = {name: np.concatenate([left_out[name], right_out[name]]) for name in left_out}
        return merged, {**left_failed, **right_failed}

    def _no_outputs(self) -> dict[str, np.ndarray]:
        return {
            b.tensor: np.empty((0, max(b.width, 1)), dtype=np.dtype(TRITON_NUMPY[b.datatype]))
            for b in self.outputs
        }

    async def _request(self, tensors: dict[str, np.ndarray], slot: Slot | None) -> dict[str, np.ndarray]:
        """One request, retried on transient errors; tensors go in ``slot`` when shared memory is on."""
        settings, client = self.settings, self._client
        rows = len(next(iter(tensors.values())))
        if slot is not None:
            infer_inputs, requested = self._pool.request(slot, tensors)
        else:
            infer_inputs = []
            for binding in self.inputs:
                values = tensors[binding.tensor]
                item = InferInput(binding.tensor, list(values.shape), binding.datatype)
                item.set_data_from_numpy(values)
                infer_inputs.append(item)
            requested = [InferRequestedOutput(b.tensor, class_count=b.class_count) for b in self.outputs]
        what = f"request of {rows:,} rows to model {settings.model_name!r}"

        stream, pool = self._infer_stream, self._pool

        async def request() -> Any:
            if slot is not None and self._server_may_have_restarted:
                await pool.ensure_registered()  # a restarted server has forgotten the regions
                self._server_may_have_restarted = False
            if stream is not None:
                try:
                    return await stream.infer(
                        settings.model_name,
                        infer_inputs,
                        settings.model_version,
                        requested,
                        settings.request_timeout,
                    )
                except StreamRequestError:
                    pass  # refused: ask again as a unary call, whose status tells bad input from a fault
            return await client.infer(
                settings.model_name,
                infer_inputs,
                model_version=settings.model_version,
                outputs=requested,
                client_timeout=settings.request_timeout,
                headers=self.headers,
            )

        def count_retry() -> None:
            self.retries += 1
            self._server_may_have_restarted = True

        sent = time.monotonic()
        try:
            result = await settings.retry.call(request, self.log, what, count_retry)
        except InferenceServerException as error:
            if is_transient(error):
                raise ServerUnavailableError(
                    f"The Triton server did not answer a {what} after {settings.retry.max_attempts} attempts "
                    f"({error_status(error)}: {error.message()}). Check that the server is running and "
                    "reachable; Airflow retries the task, which rewrites this chunk's outputs."
                ) from error
            if is_bad_input(error):
                raise
            raise InferenceError(f"Model {settings.model_name!r} failed a {what}: {error}") from error
        self.requests += 1
        self.latency.add(time.monotonic() - sent)
        if slot is not None:
            return self._pool.outputs_of(slot, rows)
        return {b.tensor: result.as_numpy(b.tensor) for b in self.outputs}
