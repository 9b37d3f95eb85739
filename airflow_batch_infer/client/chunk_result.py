"""What one chunk's inference produced: counts, part paths and timings, small enough for XCom."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
