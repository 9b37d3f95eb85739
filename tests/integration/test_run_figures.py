"""What the infer tasks read for the run report, against a real local tritonserver: the model's
cumulative counters (requests, rows, batches by size) and GPU utilisation (none on a CPU server)."""

from __future__ import annotations

import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient

from airflow_batch_infer.hooks.triton import TritonHook
from airflow_batch_infer.report import server_figures
from airflow_batch_infer.runtimes.base import ServerInfo
from airflow_batch_infer.runtimes.statistics import gpu_utilization, model_snapshot, server_work, size_bin


def send(url: str, rows: int) -> None:
    client = grpcclient.InferenceServerClient(url)
    try:
        features = grpcclient.InferInput("features", [rows, 16], "FP32")
        features.set_data_from_numpy(np.ones((rows, 16), dtype=np.float32))
        client.infer("risk_scorer", [features])
    finally:
        client.close()


def test_counters_read_before_and_after_give_the_requests_rows_and_batch_sizes(triton_server) -> None:
    hook = TritonHook(url=triton_server.grpc_url)
    try:
        before = model_snapshot(hook, "risk_scorer")
        for rows in (7, 7, 300):
            send(triton_server.grpc_url, rows)
        # Triton counts a request after its response: the reading waits for the 3 requests sent.
        after = model_snapshot(hook, "risk_scorer", settled=before, requests=3)
    finally:
        hook.close()
    figures = server_figures([{"server": "s", "statistics": [before, after]}])
    assert (figures["requests"], figures["rows"], figures["executions"]) == (3, 314, 3)
    assert figures["batch_sizes"] == {"7": 2, str(size_bin(300)): 1}  # sizes over 64 in log-spaced bins
    assert 256 < size_bin(300) <= 300
    assert figures["average_batch_size"] == round(314 / 3, 2)
    assert figures["compute_ms_per_request"] > 0


def test_a_cpu_server_reports_no_gpu_utilisation(triton_server) -> None:
    with urllib.request.urlopen(triton_server.metrics_url, timeout=5) as response:
        assert b"nv_inference_count" in response.read()  # the endpoint answers, with no GPU gauge
    assert gpu_utilization(triton_server.metrics_url) is None
    assert model_snapshot(TritonHook(url="127.0.0.1:1"), "risk_scorer") is None  # nobody there: not read


def test_what_a_server_did_reads_the_same_over_http_and_grpc(triton_server) -> None:
    """The stop task's figures: over HTTP where the server has it, over gRPC where it has only that."""
    send(triton_server.grpc_url, 5)
    over_http = server_work(triton_server)
    grpc_only = ServerInfo.from_dict(dict(triton_server.to_dict(), http_url=None))
    assert over_http == server_work(grpc_only)
    assert over_http["inference_count"] >= 5
    assert over_http["requests"] >= 1
    gone = ServerInfo.from_dict(dict(triton_server.to_dict(), http_url="http://127.0.0.1:1", grpc_url=None))
    assert server_work(gone) == {}  # nobody there: nothing, and the stop goes on
