"""One request's rows through the model: sent with retries (on the stream or as a unary call, through
shared memory or gRPC), split in halves where the server refuses some rows until those rows are found,
and sorted into rows kept with their outputs and rows set aside with a reason."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from airflow_batch_infer.client.chunk_reader import EncodedRequest
from airflow_batch_infer.client.input_binding import InputBinding
from airflow_batch_infer.client.output_binding import OutputBinding
from airflow_batch_infer.client.retry import error_status, is_bad_input, is_transient
from airflow_batch_infer.client.settings import StreamSettings
from airflow_batch_infer.client.shared_memory import SharedMemoryPool, Slot
from airflow_batch_infer.client.stream import InferStream, StreamRequestError
from airflow_batch_infer.client.tensors import TRITON_NUMPY
from airflow_batch_infer.client.timing import LatencyHistogram


class InferenceError(RuntimeError):
    """Inference on a chunk cannot go on (server gone past the retry budget, model error)."""


class ServerUnavailableError(InferenceError):
    """The server stayed unreachable past the retry budget: another server of the run may finish the chunk."""


@dataclass
class Piece:
    """The outcome of one request: rows that got outputs, and rows set aside with reasons."""

    kept: pa.RecordBatch
    outputs: dict[str, np.ndarray]
    rejected: pa.RecordBatch
    reasons: list[str]


@dataclass(eq=False)
class RequestSender:
    """Sends a chunk's requests to one model and counts them.

    Connect it (:attr:`client`, and :attr:`pool` and :attr:`stream` where used) before sending.

    :param inputs: checked input bindings.
    :param outputs: checked output bindings.
    :param settings: model, timeouts and retries.
    :param kept_columns: columns of a request's rows that go to the outputs (the row id column first).
    :param headers: headers sent with every unary call.
    :param log: where retries are logged.
    """

    inputs: Sequence[InputBinding]
    outputs: Sequence[OutputBinding]
    settings: StreamSettings
    kept_columns: list[str]
    headers: dict[str, str] | None
    log: logging.Logger
    requests: int = 0  # requests answered
    retries: int = 0  # requests sent again after a transient failure
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    client: aioclient.InferenceServerClient | None = None
    pool: SharedMemoryPool | None = None  # the chunk's shared memory, when tensors go through it
    stream: InferStream | None = None  # the bidirectional stream, for transport="stream"
    server_may_have_restarted: bool = False  # register the shared memory again before the next request

    async def infer_batch(self, request: EncodedRequest) -> Piece:
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
        slot = await self.pool.acquire() if self.pool else None
        try:
            outputs, failed = await self._infer_rows(tensors, range(len(kept_idx)), slot)
        finally:
            if slot is not None:
                self.pool.release(slot)
            if request.lease is not None:
                request.lease.done()
        id_and_pass = batch.select(self.kept_columns)
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
        return Piece(kept=kept, outputs=outputs, rejected=rejected, reasons=reject_reasons)

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
            return await self.request(rows, slot), {}
        except InferenceServerException as error:
            if not is_bad_input(error):
                raise
            if slot is not None and "shared memory" in (error.message() or "").lower():
                # Not the rows' fault: the server restarted and lost the regions. Register them again.
                if reregistered:
                    raise InferenceError(f"The server refuses this job's shared memory: {error}") from error
                self.server_may_have_restarted = True
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

    async def request(self, tensors: dict[str, np.ndarray], slot: Slot | None) -> dict[str, np.ndarray]:
        """One request, retried on transient errors; tensors go in ``slot`` when shared memory is on."""
        settings, client = self.settings, self.client
        rows = len(next(iter(tensors.values())))
        if slot is not None:
            infer_inputs, requested = self.pool.request(slot, tensors)
        else:
            infer_inputs = []
            for binding in self.inputs:
                values = tensors[binding.tensor]
                item = InferInput(binding.tensor, list(values.shape), binding.datatype)
                item.set_data_from_numpy(values)
                infer_inputs.append(item)
            requested = [InferRequestedOutput(b.tensor, class_count=b.class_count) for b in self.outputs]
        what = f"request of {rows:,} rows to model {settings.model_name!r}"

        stream, pool = self.stream, self.pool

        async def request() -> Any:
            if slot is not None and self.server_may_have_restarted:
                await pool.ensure_registered()  # a restarted server has forgotten the regions
                self.server_may_have_restarted = False
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
            self.server_may_have_restarted = True

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
            return self.pool.outputs_of(slot, rows)
        return {b.tensor: result.as_numpy(b.tensor) for b in self.outputs}
