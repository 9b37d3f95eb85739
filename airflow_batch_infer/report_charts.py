"""The run report's two charts, drawn by matplotlib (Agg backend) as PNG bytes: rows/s over time with the
infer tasks stacked, and the server's batch sizes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_BINS = 60


def throughput_series(
    tasks: Sequence[Sequence[Sequence[float]]], bins: int = _BINS
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rows/s of each task over the infer phase, on one time grid.

    :param tasks: per task, its ``[seconds since the phase started, rows done]`` samples, in time order.
    :param bins: time bins over the phase.
    :returns: the bins' start times and, per task, its rows/s in each bin (rows done between the bin's
        edges, interpolated between samples, over the bin's width).
    """
    end = max((s[-1][0] for s in tasks if s), default=0.0)
    edges = np.linspace(0.0, max(end, 1e-3), bins + 1)
    width = edges[1] - edges[0]
    rates = []
    for samples in tasks:
        if not samples:
            rates.append(np.zeros(bins))
            continue
        times = np.array([s[0] for s in samples], dtype=float)
        done = np.array([s[1] for s in samples], dtype=float)
        cumulative = np.interp(edges, times, done, left=0.0, right=done[-1])
        rates.append(np.diff(cumulative) / width)
    return edges[:-1], rates


def throughput_chart(tasks: Sequence[Sequence[Sequence[float]]], labels: Sequence[str]) -> bytes:
    """PNG: rows/s over time, one band per infer task, stacked (the top edge is the job's rows/s).

    :param tasks: per task, its ``[seconds since the phase started, rows done]`` samples.
    :param labels: a label per task (its chunk).
    """
    starts, rates = throughput_series(tasks)
    figure, axes = _figure()
    if rates:
        axes.stackplot(starts, *rates, labels=list(labels), step="post", alpha=0.85)
    else:  # persist was given no infer results
        axes.text(
            0.5, 0.5, "no infer task results: no progress recorded", ha="center", transform=axes.transAxes
        )
    axes.set_xlabel("seconds since the first infer task started")
    axes.set_ylabel("rows/s")
    axes.set_title("Rows/s over time, all infer tasks stacked")
    if 1 < len(labels) <= 12:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _png(figure)


def batch_size_chart(batches: Mapping[str, int]) -> bytes:
    """PNG: how many model executions (batches) the server ran at each batch size.

    :param batches: batch size (as text) → executions, from Triton's ``batch_stats``.
    """
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    sizes = sorted((int(size), count) for size, count in batches.items() if count)
    figure, axes = _figure()
    if sizes and sizes[-1][0] <= 64:  # small sizes: one bar each
        axes.bar([s for s, _ in sizes], [c for _, c in sizes], width=0.8)
    elif sizes:  # larger ones come in log-spaced bins (eight per doubling): one bar per bin, log axis
        values, counts = [s for s, _ in sizes], [c for _, c in sizes]
        widths = [v * (2 ** (1 / 8) - 1) if v > 64 else 1 for v in values]
        axes.bar(values, counts, width=widths, align="edge", edgecolor="white")
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_formatter(ScalarFormatter())  # 16384, not 2^14
    else:
        axes.text(0.5, 0.5, "the server reported no batches", ha="center", transform=axes.transAxes)
    axes.set_xlabel("batch size (rows per model execution)")
    axes.set_ylabel("executions")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title("Batch sizes the server executed")
    return _png(figure)


def _figure() -> tuple[Figure, Axes]:
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display, no GUI toolkit: files only
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
