"""What a server did, from Triton's own statistics: rows inferred, requests and batches executed."""

from __future__ import annotations

import logging
from typing import Any

from airflow_batch_infer.runtimes.base import ServerInfo

log = logging.getLogger(__name__)


def server_work(info: ServerInfo, timeout: float = 5.0) -> dict[str, int]:
    """Rows inferred (``inference_count``), successful ``requests`` and model ``executions`` (batches) of
    every model the server serves, summed; ``{}`` when the server cannot be asked (gone, unreachable).

    :param info: the server.
    :param timeout: seconds for the statistics call.
    """
    import tritonclient.grpc as grpcclient

    if not info.grpc_url:
        return {}
    try:
        client = grpcclient.InferenceServerClient(info.grpc_url)
        try:
            stats: dict[str, Any] = client.get_inference_statistics(as_json=True, client_timeout=timeout)
        finally:
            client.close()
    except Exception as error:
        log.info("Could not read the statistics of Triton server %s: %s", info.handle.get("server_id"), error)
        return {}
    totals = {"inference_count": 0, "requests": 0, "executions": 0}
    for model in stats.get("model_stats", []):
        totals["inference_count"] += int(model.get("inference_count") or 0)
        totals["executions"] += int(model.get("execution_count") or 0)
        totals["requests"] += int(
            ((model.get("inference_stats") or {}).get("success") or {}).get("count") or 0
        )
    return totals
