"""How a chunk is streamed through the server: request size, concurrency, timeouts, retries, transport."""

from __future__ import annotations

from dataclasses import dataclass, field

from airflow_batch_infer.client.retry import RetryPolicy


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
