"""What a server did, from Triton's own statistics: rows inferred, requests and batches executed."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from airflow_batch_infer.runtimes.base import ServerInfo

log = logging.getLogger(__name__)


def server_work(info: ServerInfo, timeout: float = 5.0) -> dict[str, int]:
    """Rows inferred (``inference_count``), successful ``requests`` and model ``executions`` (batches) of
    every model the server serves, summed; ``{}`` when the server cannot be asked (gone, unreachable).

    Asked over HTTP where the server has an HTTP endpoint (the stop task then imports no gRPC client and
    numpy: 0.1 s of its 0.4), else over gRPC.

    :param info: the server.
    :param timeout: seconds for the statistics call.
    """
    try:
        stats = (
            _statistics_over_http(info, timeout) if info.http_url else _statistics_over_grpc(info, timeout)
        )
    except Exception as error:
        log.info("Could not read the statistics of Triton server %s: %s", info.handle.get("server_id"), error)
        return {}
    if stats is None:
        return {}
    counters = totals(stats)
    return {key: counters[key] for key in ("inference_count", "requests", "executions")}


def _statistics_over_http(info: ServerInfo, timeout: float) -> dict[str, Any]:
    import httpx

    from airflow_batch_infer.runtimes.probe import client_options

    with httpx.Client(**client_options(info, timeout)) as client:
        response = client.get(f"{info.http_url.rstrip('/')}/v2/models/stats")
    response.raise_for_status()
    return response.json()


def _statistics_over_grpc(info: ServerInfo, timeout: float) -> dict[str, Any] | None:
    import tritonclient.grpc as grpcclient

    if not info.grpc_url:
        return None
    client = grpcclient.InferenceServerClient(info.grpc_url)
    try:
        return client.get_inference_statistics(as_json=True, client_timeout=timeout)
    finally:
        client.close()


def model_snapshot(
    hook: Any, model_name: str, settled: dict[str, Any] | None = None, requests: int = 0, wait: float = 2.0
) -> dict[str, Any] | None:
    """Triton's cumulative counters for ``model_name`` (all versions summed), for the run report: successful
    ``requests``, ``queue_ns`` and ``compute_ns`` (input + infer + output) over them, rows
    (``inference_count``), ``executions`` (batches) and ``batches`` (batch size → executions; sizes over 64
    in bins, see :func:`size_bin`, so that the reading stays small for XCom). ``None`` when the server
    cannot be asked: the report then says so.

    Triton counts a request once its response is sent, so a reading taken just after the last response
    may miss it: given the reading at the start (``settled``) and the ``requests`` the client saw succeed
    since, this reads again (for up to ``wait`` seconds) until the server has counted at least those.

    :param hook: a :class:`~airflow_batch_infer.hooks.triton.TritonHook` of the server.
    :param model_name: the model.
    :param settled: an earlier reading of the same server, or ``None``.
    :param requests: requests that succeeded since ``settled``.
    :param wait: seconds to wait at most for the counters to catch up.
    """
    deadline = time.monotonic() + wait
    while True:
        snapshot = _read_snapshot(hook, model_name)
        if snapshot is None or settled is None or time.monotonic() > deadline:
            return snapshot
        if snapshot["requests"] >= settled["requests"] + requests:
            return snapshot
        time.sleep(0.02)


def _read_snapshot(hook: Any, model_name: str) -> dict[str, Any] | None:
    try:
        stats = hook.get_inference_statistics(model_name)
    except Exception as error:
        log.info("Could not read the statistics of model %s at %s: %s", model_name, hook.url, error)
        return None
    return totals(stats)


def totals(stats: dict[str, Any]) -> dict[str, Any]:
    """Triton's statistics (``get_inference_statistics``, as JSON) summed over the models and versions in
    them: successful ``requests``, ``queue_ns``, ``compute_ns`` (input + infer + output), rows
    (``inference_count``), ``executions`` (batches) and ``batches`` (size bin → executions)."""
    summed: dict[str, Any] = {
        "requests": 0,
        "queue_ns": 0,
        "compute_ns": 0,
        "inference_count": 0,
        "executions": 0,
        "batches": {},
    }
    for model in stats.get("model_stats", []):
        inference = model.get("inference_stats") or {}
        summed["requests"] += int((inference.get("success") or {}).get("count") or 0)
        summed["queue_ns"] += int((inference.get("queue") or {}).get("ns") or 0)
        for phase in ("compute_input", "compute_infer", "compute_output"):
            summed["compute_ns"] += int((inference.get(phase) or {}).get("ns") or 0)
        summed["inference_count"] += int(model.get("inference_count") or 0)
        summed["executions"] += int(model.get("execution_count") or 0)
        for batch in model.get("batch_stats") or []:
            size = str(size_bin(int(batch.get("batch_size") or 0)))
            count = int((batch.get("compute_infer") or {}).get("count") or 0)
            summed["batches"][size] = summed["batches"].get(size, 0) + count
    return summed


def size_bin(size: int) -> int:
    """The batch-size bin that ``size`` counts in: itself up to 64, then the lower bound of one of eight
    log-spaced bins per doubling (137 bins up to 32,768)."""
    if size <= 64:
        return size
    return max(65, int(2 ** (math.floor(math.log2(size) * 8) / 8)))


def gpu_utilization(metrics_url: str, timeout: float = 2.0) -> float | None:
    """The mean of the server's ``nv_gpu_utilization`` gauges (0-1) from its Prometheus metrics endpoint;
    ``None`` where it reports none (a CPU-only server) or cannot be reached.

    :param metrics_url: ``http://host:port/metrics``.
    :param timeout: seconds for the request.
    """
    import urllib.request

    if not metrics_url:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as response:  # noqa: S310 (the server's own)
            text = response.read().decode(errors="replace")
    except Exception as error:
        log.info("Could not read the metrics at %s: %s", metrics_url, error)
        return None
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("nv_gpu_utilization")
    ]
    return round(sum(values) / len(values), 4) if values else None
