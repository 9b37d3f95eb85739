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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from airflow_batch_infer.chunk_input import ChunkInput, StagedChunk
from airflow_batch_infer.client.chunk_reader import READ_BUFFERS, ChunkReader, EncodedRequest
from airflow_batch_infer.client.chunk_result import ChunkResult
from airflow_batch_infer.client.input_binding import InputBinding
from airflow_batch_infer.client.memory_pool import reusing_memory_pool
from airflow_batch_infer.client.output_binding import OutputBinding, output_arrays, output_fields
from airflow_batch_infer.client.part_writer import PartBuffer, Postprocess
from airflow_batch_infer.client.request_sender import (
    InferenceError,
    Piece,
    RequestSender,
    ServerUnavailableError,
)
from airflow_batch_infer.client.settings import StreamSettings
from airflow_batch_infer.client.shared_memory import SharedMemoryPool, server_is_local, supports_shared_memory
from airflow_batch_infer.client.stream import InferStream
from airflow_batch_infer.client.timing import ProgressSamples
from airflow_batch_infer.staging import atomic_target, commit
from airflow_batch_infer.storage import discard, is_remote, remove_stale_temps

# What callers import from here: the loop, its settings and result, and its errors.
__all__ = [
    "REASON_COLUMN",
    "ChunkResult",
    "ChunkStreamer",
    "InferenceError",
    "ServerUnavailableError",
    "StreamSettings",
]

REASON_COLUMN = "reject_reason"
REORDER_WINDOWS = 4  # completed requests held for row order, in multiples of the requests in flight


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
        self.tokens_out = 0
        self.progress = ProgressSamples()
        self._sender = RequestSender(
            self.inputs,
            self.outputs,
            settings,
            [row_id_column, *self.passthrough_columns],
            headers,
            self.log,
        )
        self._pool_used = False

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
        reader = ChunkReader(chunk, needed, self.inputs, self.settings.request_rows)
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
        sender = self._sender
        try:
            async with self.client_factory() as client, contextlib.AsyncExitStack() as stack:
                sender.client = client
                sender.pool = await self._open_pool(client, stack, reader.read_rows)
                self._pool_used = sender.pool is not None
                # On the way out, the read under way (perhaps encoding into the pool) ends before the pool
                # is unmapped: writing into an unmapped region would crash the task.
                stack.callback(reader.close)
                if self.settings.transport == "stream":
                    sender.stream = InferStream(client, self.headers)
                    stack.push_async_callback(sender.stream.close)
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
            sender.client = sender.pool = sender.stream = None
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
            requests=sender.requests,
            retries=sender.retries,
            shared_memory=self._pool_used,
            tokens_out=self.tokens_out,
            started_at=self.progress.samples[0][0],
            latency=sender.latency.to_dict(),
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
        reader: ChunkReader,
        first_read: asyncio.Task[list[EncodedRequest] | None],
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
        ordered: asyncio.Queue[asyncio.Task[Piece] | None] = asyncio.Queue(
            maxsize=REORDER_WINDOWS * settings.max_in_flight
        )

        pool, infer_batch = self._sender.pool, self._sender.infer_batch

        async def produce() -> None:
            # Decoding and encoding the next read runs in a thread while this one's requests are sent.
            read = first_read
            while True:
                requests = await read
                if requests is None:
                    break
                read = asyncio.create_task(reader.read_into(pool))
                for request in requests:
                    await window.acquire()
                    task = asyncio.create_task(infer_batch(request))
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
            self._sender.requests,
            self._sender.retries,
        )
