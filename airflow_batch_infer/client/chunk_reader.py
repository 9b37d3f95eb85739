"""The chunk read ahead of the requests: reads of a few requests' worth, each decoded and encoded into
tensors at once (straight into a shared memory read buffer when there is one), then cut into requests."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from airflow_batch_infer.chunk_input import ChunkInput
from airflow_batch_infer.client.encoding import encode_batch
from airflow_batch_infer.client.input_binding import InputBinding
from airflow_batch_infer.client.shared_memory import ReadBuffer, SharedMemoryPool
from airflow_batch_infer.client.tensors import row_bytes

READ_ROWS = 65_536  # most rows decoded at once from the chunk
READ_BYTES = 16 << 20  # about the most bytes decoded at once (a few requests of long texts)
READ_BUFFERS = 3  # shared memory read buffers: one being encoded, one being sent, one finishing


@dataclass
class ReadLease:
    """A read buffer held until every request pointing into it is done."""

    pool: SharedMemoryPool
    buffer: ReadBuffer
    pending: int

    def done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            self.pool.release_read(self.buffer)


@dataclass
class EncodedRequest:
    """The rows of one request, encoded: tensors for every row, which rows are good, and why the others
    are not (by position in the request)."""

    batch: pa.RecordBatch
    tensors: dict[str, np.ndarray]
    good: np.ndarray
    reasons: dict[int, str]
    lease: ReadLease | None = None


class ChunkReader:
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

    async def read(self, into: Mapping[str, np.ndarray] | None) -> list[EncodedRequest] | None:
        """``next`` in the reader's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.next, into)

    async def read_into(self, pool: SharedMemoryPool | None) -> list[EncodedRequest] | None:
        """The next read, encoded straight into a free read buffer of ``pool`` when it has them; the
        buffer goes back to the pool once every request of the read is done.

        :param pool: the chunk's shared memory, if any.
        """
        if pool is None or not pool.read_buffer_count:
            return await self.read(None)
        buffer = await pool.acquire_read()
        try:
            requests = await self.read(buffer.arrays)
        except BaseException:
            pool.release_read(buffer)
            raise
        if not requests:
            pool.release_read(buffer)
            return requests
        lease = ReadLease(pool, buffer, len(requests))
        for request in requests:
            request.lease = lease
        return requests

    def close(self) -> None:
        """Stop the reader's thread, after the read under way if any."""
        self._thread.shutdown(wait=True, cancel_futures=True)

    def next(self, into: Mapping[str, np.ndarray] | None) -> list[EncodedRequest] | None:
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
                EncodedRequest(
                    batch=read.slice(start, size),
                    tensors={name: values[start:end] for name, values in tensors.items()},
                    good=good[start:end],
                    reasons=reasons_by_request[number],
                )
            )
        return requests
