"""What an infer task measures for the run report, in bounded space: request latencies as a histogram and
a few progress samples (rows done over time), both small enough for XCom.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

# Latency buckets grow by 10% from 0.1 ms: bucket i holds (0.1 ms * 1.1**(i-1), 0.1 ms * 1.1**i];
# 200 buckets reach past 1,000 s. A percentile read from them is off by 10% at most.
_FIRST_MS = 0.1
_GROWTH = 1.1
_BUCKETS = 200
MAX_SAMPLES = 64


class LatencyHistogram:
    """Request latencies as counts per log-spaced bucket (not every latency), mergeable across tasks."""

    def __init__(self, counts: Mapping[int | str, int] | None = None) -> None:
        self.counts: dict[int, int] = {int(k): int(v) for k, v in (counts or {}).items()}

    def add(self, seconds: float) -> None:
        ms = seconds * 1000.0
        bucket = 0 if ms <= _FIRST_MS else min(_BUCKETS, math.ceil(math.log(ms / _FIRST_MS, _GROWTH)))
        self.counts[bucket] = self.counts.get(bucket, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile_ms(self, share: float) -> float | None:
        """The latency in ms below which ``share`` (0-1) of the requests fall (a bucket's upper bound)."""
        total = self.total
        if not total:
            return None
        rank, seen = share * total, 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return round(_FIRST_MS * _GROWTH**bucket, 3)
        return round(_FIRST_MS * _GROWTH ** max(self.counts), 3)

    def to_dict(self) -> dict[str, int]:
        return {str(k): v for k, v in sorted(self.counts.items())}

    @classmethod
    def merged(cls, histograms: Iterable[Mapping[int | str, int]]) -> LatencyHistogram:
        result = cls()
        for counts in histograms:
            for bucket, count in (counts or {}).items():
                result.counts[int(bucket)] = result.counts.get(int(bucket), 0) + int(count)
        return result


class ProgressSamples:
    """Rows done at a few moments of a task (wall clock, seconds since the epoch), at most
    :data:`MAX_SAMPLES`: when full, every other sample is dropped and the interval doubles.

    :param interval: seconds between samples at first.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.samples: list[list[float]] = [[round(time.time(), 3), 0]]
        self._last = time.monotonic()

    def add(self, rows: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self.samples.append([round(time.time(), 3), rows])
        if len(self.samples) > MAX_SAMPLES:
            self.samples = (
                self.samples[:1] + self.samples[2::2] if len(self.samples) % 2 else self.samples[::2]
            )
            self.interval *= 2
