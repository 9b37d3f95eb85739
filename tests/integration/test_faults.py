"""Faults with real processes: the Triton server is killed in the middle of a chunk.

With the local runtime's supervisor, the server comes back on the same ports and the chunk finishes with
every row exactly once; without it, the task fails after its retry budget with a message that says what
to do, and leaves no part file behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transactions_data import FEATURES, write_transactions

from airflow_batch_infer.client.retry import RetryPolicy
from airflow_batch_infer.client.streaming import ChunkStreamer, InferenceError, StreamSettings
from airflow_batch_infer.client.tensors import bind_inputs, bind_outputs
from airflow_batch_infer.hooks.triton import TritonHook
from airflow_batch_infer.runtimes import get_runtime
from airflow_batch_infer.runtimes.access import server_headers
from airflow_batch_infer.staging import output_part_path, rejects_part_path, stage_parquet
from tests.conftest import MODEL_REPOSITORY, chunk_threads, processes_mentioning

pytestmark = pytest.mark.integration

ROWS = 300_000
PATIENT = RetryPolicy(max_attempts=10, max_delay=60, initial_wait=0.25, max_wait=4)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_transactions(root / "in", ROWS, files=1)
    return stage_parquet(root / "in", root / "run", chunk_rows=ROWS, snapshot="copy")


def tritonserver_pid(info) -> int:
    """The pid of the tritonserver process itself (under the supervisor)."""
    for pid in processes_mentioning(f"--id={info.handle['server_id']}"):
        if Path(f"/proc/{pid}/exe").resolve().name == "tritonserver":
            return pid
    raise AssertionError("no tritonserver process found")


def kill_after_progress(info, requests: int) -> threading.Thread:
    """SIGKILL the server once it has answered ``requests`` requests (mid-chunk), in the background."""
    hook = TritonHook(url=info.grpc_url)

    def run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = hook.get_inference_statistics("risk_scorer")["model_stats"][0]
            if int(stats["inference_stats"]["success"].get("count", 0)) >= requests:
                os.kill(tritonserver_pid(info), signal.SIGKILL)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def streamer(
    info, manifest, transport: str, shared_memory: str, retry: RetryPolicy = PATIENT
) -> ChunkStreamer:
    hook = TritonHook(url=info.grpc_url)
    metadata, config = hook.get_model_metadata("risk_scorer"), hook.get_model_config("risk_scorer")
    schema = pq.read_schema(manifest.chunks[0].path)
    return ChunkStreamer(
        inputs=bind_inputs({"features": FEATURES}, schema, metadata, config["max_batch_size"]),
        outputs=bind_outputs({"probability": "score"}, metadata, config["max_batch_size"]),
        settings=StreamSettings(
            "risk_scorer",
            request_rows=512,
            max_in_flight=2,
            transport=transport,
            shared_memory=shared_memory,
            retry=retry,
            request_timeout=10,
        ),
        row_id_column="row_id",
        client_factory=hook.get_async_client,
        url=info.grpc_url,
        headers=server_headers(info),
    )


@pytest.mark.parametrize(("transport", "shared_memory"), [("stream", "on"), ("unary", "off")])
def test_a_killed_server_comes_back_and_the_chunk_finishes_with_every_row_once(
    manifest, tmp_path, transport, shared_memory
) -> None:
    runtime = get_runtime("local", work_root=str(tmp_path / "servers"), max_restarts=3)
    info = runtime.start(str(MODEL_REPOSITORY), ["risk_scorer"])
    try:
        killer = kill_after_progress(info, requests=40)
        chunk = manifest.chunks[0]
        result = streamer(info, manifest, transport, shared_memory).run(
            chunk.path, output_part_path(tmp_path, 0), rejects_part_path(tmp_path, 0)
        )
        killer.join(timeout=5)
    finally:
        runtime.stop(info)

    assert "[supervisor] server died" in Path(info.handle["log_path"]).read_text()
    assert result.retries > 0
    assert (result.rows_out, result.rows_rejected) == (ROWS, 0)
    ids = pq.read_table(result.output_path).column("row_id").to_pylist()
    assert ids == list(range(ROWS))
    assert processes_mentioning(info.handle["server_id"]) == []


def test_a_server_that_stays_down_fails_the_chunk_with_a_clear_message(manifest, tmp_path) -> None:
    runtime = get_runtime("local", work_root=str(tmp_path / "servers"), max_restarts=0)
    info = runtime.start(str(MODEL_REPOSITORY), ["risk_scorer"])
    s = streamer(info, manifest, "stream", "off", retry=RetryPolicy(max_attempts=3, initial_wait=0.1))
    try:
        kill_after_progress(info, requests=20)
        chunk = manifest.chunks[0]
        with pytest.raises(
            InferenceError, match=r"did not answer .* after 3 attempts .*Check that the server is running"
        ):
            s.run(chunk.path, output_part_path(tmp_path, 0), rejects_part_path(tmp_path, 0))
    finally:
        runtime.stop(info)
    assert not list((tmp_path / "outputs").iterdir())  # no part, no temporary file
    assert not list((tmp_path / "rejects").iterdir())
    assert not chunk_threads()
