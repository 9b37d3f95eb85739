"""One bidirectional gRPC stream (``ModelStreamInfer``) shared by the requests in flight.

A unary call costs the client about twice the CPU of a message on an open stream, so the client sends
its requests on a stream and matches the responses by request id. The stream is opened on first use
and again after it breaks; a broken stream fails every request waiting on it with the gRPC status, so
the caller's retry policy treats it like a failed unary call.

tritonclient's own ``stream_infer`` drops the request id of error responses, so this module drives
the generated stub with tritonclient's request builder (``tritonclient.grpc._utils``): pinned in
``pyproject.toml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import InferenceServerException


class StreamRequestError(RuntimeError):
    """The server answered one request on the stream with an error (the stream itself is fine).

    Stream responses carry the message but not the status code; send the request again as a unary call
    to learn whether it is bad input or a transient fault.
    """


_BROKEN_STREAM = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED})


def _stream_broken(message: str) -> InferenceServerException:
    return InferenceServerException(msg=message, status="StatusCode.UNAVAILABLE")


class InferStream:
    """Requests over one ``ModelStreamInfer`` call, answered by request id.

    :param client: the asyncio gRPC client whose channel carries the stream.
    :param headers: headers sent when the stream opens.
    """

    def __init__(
        self, client: aioclient.InferenceServerClient, headers: dict[str, str] | None = None
    ) -> None:
        self._client = client
        self._headers = headers
        self._ids = itertools.count()
        self._queue: asyncio.Queue[Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._call: Any = None
        self._pending: dict[str, asyncio.Future[InferResult]] = {}

    def _open(self) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def requests() -> AsyncIterator[Any]:
            while (request := await queue.get()) is not None:
                yield request

        self._queue = queue
        self._call = self._client._client_stub.ModelStreamInfer(
            requests(), metadata=self._client._get_metadata(self._headers)
        )
        self._reader = asyncio.create_task(self._read(self._call, self._pending))

    async def _read(self, call: Any, pending: dict[str, asyncio.Future[InferResult]]) -> None:
        """Hand each response to the request waiting for it; fail them all when the stream breaks."""
        error: InferenceServerException = _stream_broken("the inference stream ended")
        try:
            async for response in call:
                future = pending.pop(response.infer_response.id, None)
                if future is None or future.done():
                    continue  # a request that already timed out
                if response.error_message:
                    future.set_exception(StreamRequestError(response.error_message))
                else:
                    future.set_result(InferResult(response.infer_response))
        except grpc.RpcError as rpc_error:
            code = rpc_error.code()
            # A server killed under an open stream shows as INTERNAL or UNKNOWN ("Internal error from
            # Core"), not UNAVAILABLE: the stream broke, so the requests on it are retried like any lost one.
            status = "StatusCode.UNAVAILABLE" if code in _BROKEN_STREAM else str(code)
            error = InferenceServerException(
                msg=f"the inference stream broke ({code}: {rpc_error.details()})",
                status=status,
                debug_details=rpc_error.debug_error_string(),
            )
        except asyncio.CancelledError:
            error = _stream_broken("the inference stream was closed")
            raise
        finally:
            for future in pending.values():
                if not future.done():
                    future.set_exception(error)
            pending.clear()

    async def infer(
        self,
        model_name: str,
        inputs: Sequence[InferInput],
        model_version: str = "",
        outputs: Sequence[InferRequestedOutput] | None = None,
        timeout: float | None = None,
    ) -> InferResult:
        """Send one request on the stream and wait for its response.

        :raises InferenceServerException: the stream broke (status ``UNAVAILABLE`` or the stream's own),
            or no response came within ``timeout`` (status ``DEADLINE_EXCEEDED``).
        :raises StreamRequestError: the server refused this request.
        """
        if self._reader is None or self._reader.done():
            self._pending = {}
            self._open()
        request_id = str(next(self._ids))
        future: asyncio.Future[InferResult] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._queue.put_nowait(
            _get_inference_request(
                model_name=model_name,
                inputs=list(inputs),
                model_version=model_version,
                request_id=request_id,
                outputs=list(outputs) if outputs else None,
                sequence_id=0,
                sequence_start=False,
                sequence_end=False,
                priority=0,
                timeout=None,
                parameters=None,
            )
        )
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(request_id, None)
            raise InferenceServerException(
                msg=f"no response on the inference stream within {timeout} s",
                status="StatusCode.DEADLINE_EXCEEDED",
            ) from None

    async def close(self) -> None:
        """End the stream: no more requests; waiting ones fail."""
        if self._queue is not None:
            self._queue.put_nowait(None)
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                await self._reader
        self._queue = self._call = self._reader = None
