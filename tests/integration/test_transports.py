"""Every transport (stream, unary) × shared memory (on, off), against a real tritonserver: the same rows
come out, and rows the server refuses are found by splitting requests and set aside with its message."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transactions_data import FEATURES, write_transactions

from airflow_batch_infer.client import chunk_reader, encoding, streaming
from airflow_batch_infer.client.request_sender import RequestSender
from airflow_batch_infer.client.shared_memory import SharedMemoryPool
from airflow_batch_infer.client.streaming import REASON_COLUMN, ChunkStreamer, StreamSettings
from airflow_batch_infer.client.tensors import InputBinding, OutputBinding, bind_inputs, bind_outputs
from airflow_batch_infer.hooks.triton import TritonHook
from airflow_batch_infer.runtimes import get_runtime
from airflow_batch_infer.runtimes.access import server_headers
from airflow_batch_infer.staging import output_part_path, rejects_part_path, stage_parquet
from tests.conftest import MODEL_REPOSITORY, chunk_threads

pytestmark = pytest.mark.integration

TEST_MODELS = Path(__file__).resolve().parent.parent / "models"
OPTIONS = [(t, m) for t in ("stream", "unary") for m in ("on", "off")]
REFUSED = [5, 9_999, 15_000]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with the real risk scorer and the test model that refuses some rows."""
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(MODEL_REPOSITORY / "risk_scorer", repo / "risk_scorer")
    shutil.copytree(TEST_MODELS / "picky_scorer", repo / "picky_scorer")
    runtime = get_runtime("local", work_root=str(tmp_path_factory.mktemp("servers")))
    info = runtime.start(str(repo), ["risk_scorer", "picky_scorer"])
    yield info
    runtime.stop(info)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_transactions(root / "in", 20_000, files=1)
    table = pq.read_table(root / "in")
    f00 = table.column("f00").to_numpy().copy()
    f00[REFUSED] = 1000.0
    table = table.set_column(table.schema.get_field_index("f00"), "f00", [f00])
    (root / "picky").mkdir()
    pq.write_table(table, root / "picky" / "part.parquet")
    return stage_parquet(root / "picky", root / "run", snapshot="copy")


def make_streamer(server, manifest, model: str, transport: str, shared_memory: str) -> ChunkStreamer:
    hook = TritonHook(url=server.grpc_url)
    metadata, config = hook.get_model_metadata(model), hook.get_model_config(model)
    schema = pq.read_schema(manifest.chunks[0].path)
    return ChunkStreamer(
        inputs=bind_inputs({"features": FEATURES}, schema, metadata, config["max_batch_size"]),
        outputs=bind_outputs({"probability": "score"}, metadata, config["max_batch_size"]),
        settings=StreamSettings(
            model, request_rows=2048, max_in_flight=4, transport=transport, shared_memory=shared_memory
        ),
        row_id_column="row_id",
        client_factory=hook.get_async_client,
        url=server.grpc_url,
        headers=server_headers(server),
    )


def score(server, manifest, model: str, transport: str, shared_memory: str, tmp_path: Path):
    chunk = manifest.chunks[0]
    streamer = make_streamer(server, manifest, model, transport, shared_memory)
    pool_before, jemalloc = pa.default_memory_pool().backend_name, pa.jemalloc_memory_pool()
    allocated = jemalloc.total_bytes_allocated()
    result = streamer.run(chunk.path, output_part_path(tmp_path, 0), rejects_part_path(tmp_path, 0))
    assert result.shared_memory is (shared_memory == "on")
    assert not list(Path("/dev/shm").glob(f"abi_{os.getpid()}_*")), "shared memory regions left behind"
    # The chunk was decoded from jemalloc (see memory_pool), the process's own default is back, and the
    # reader's and the writer's threads are gone.
    assert jemalloc.total_bytes_allocated() - allocated >= chunk.rows * len(FEATURES) * 4
    assert pa.default_memory_pool().backend_name == pool_before
    assert not chunk_threads()
    return result


@pytest.mark.parametrize(("transport", "shared_memory"), OPTIONS)
def test_every_option_gives_the_same_scores(server, manifest, tmp_path, transport, shared_memory) -> None:
    result = score(server, manifest, "risk_scorer", transport, shared_memory, tmp_path / "a")
    reference = score(server, manifest, "risk_scorer", "unary", "off", tmp_path / "b")
    assert result.rows_out == reference.rows_out == 20_000
    got, expected = pq.read_table(result.output_path), pq.read_table(reference.output_path)
    assert got.column("row_id").equals(expected.column("row_id"))
    np.testing.assert_array_equal(got.column("score").to_numpy(), expected.column("score").to_numpy())


@pytest.mark.parametrize(("transport", "shared_memory"), OPTIONS)
def test_rows_the_server_refuses_are_found_and_set_aside(
    server, manifest, tmp_path, transport, shared_memory
) -> None:
    result = score(server, manifest, "picky_scorer", transport, shared_memory, tmp_path)

    assert (result.rows_out, result.rows_rejected) == (20_000 - len(REFUSED), len(REFUSED))
    rejects = pq.read_table(result.rejects_path)
    assert rejects.column("row_id").to_pylist() == REFUSED
    assert all(
        reason.startswith("refused by the server:") and "feature 0 is out of range" in reason
        for reason in rejects.column(REASON_COLUMN).to_pylist()
    )
    outputs = pq.read_table(result.output_path)
    assert sorted(set(outputs.column("row_id").to_pylist()) | set(REFUSED)) == list(range(20_000))
    chunk = pq.read_table(manifest.chunks[0].path).take(outputs.column("row_id"))
    features = np.column_stack([chunk.column(f).to_numpy() for f in FEATURES]).astype(np.float32)
    expected = 1.0 / (1.0 + np.exp(-features.sum(axis=1)))
    np.testing.assert_allclose(outputs.column("score").to_numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_reads_encoded_in_shared_memory_give_every_row_once(
    server, manifest, tmp_path, monkeypatch, transport
) -> None:
    # Five reads of 4096 rows through three read buffers: later reads are encoded straight into shared
    # memory (the first one, decoded while the client connects, is copied), and buffers are used again.
    monkeypatch.setattr(chunk_reader, "READ_ROWS", 4096)
    placed = []  # for each request sent from a read buffer: which buffer (its first offset)
    place_in_reads = SharedMemoryPool._place_in_reads

    def spy(pool, tensor, values):
        where = place_in_reads(pool, tensor, values)
        if where is not None:
            starts = [b.offsets[tensor] for b in pool._reads]
            placed.append(max(start for start in starts if start <= where[1]))
        return where

    monkeypatch.setattr(SharedMemoryPool, "_place_in_reads", spy)
    result = score(server, manifest, "picky_scorer", transport, "on", tmp_path)

    assert len(placed) >= 8  # the 8 requests of reads 2–5, each sent at least once from its read
    assert len(set(placed)) == chunk_reader.READ_BUFFERS
    assert (result.rows_out, result.rows_rejected) == (20_000 - len(REFUSED), len(REFUSED))
    assert pq.read_table(result.rejects_path).column("row_id").to_pylist() == REFUSED
    outputs = pq.read_table(result.output_path)
    assert outputs.column("row_id").to_pylist() == sorted(set(range(20_000)) - set(REFUSED))
    chunk = pq.read_table(manifest.chunks[0].path).take(outputs.column("row_id"))
    features = np.column_stack([chunk.column(f).to_numpy() for f in FEATURES]).astype(np.float32)
    expected = 1.0 / (1.0 + np.exp(-features.sum(axis=1)))
    np.testing.assert_allclose(outputs.column("score").to_numpy(), expected, rtol=1e-6, atol=1e-6)


def test_a_chunk_that_fails_waits_for_the_read_under_way_before_freeing_shared_memory(
    server, manifest, tmp_path, monkeypatch
) -> None:
    # Reads of 4096 rows, requests of 2048: the third request (from the second read) fails the chunk while
    # the third read is still being encoded into a shared memory read buffer. Freeing the region under it
    # would crash the task with a segmentation fault instead of failing it with the model's error.
    monkeypatch.setattr(chunk_reader, "READ_ROWS", 4096)
    reads = []
    encode_batch, column_values = chunk_reader.encode_batch, encoding._column_values

    def counting_encode(batch, bindings, into=None):
        reads.append(into is not None)
        return encode_batch(batch, bindings, into)

    def slow_column_values(column, dtype):
        if len(reads) >= 3:
            time.sleep(0.03)  # 16 columns: the third read takes about half a second
        return column_values(column, dtype)

    request, sent = RequestSender.request, []

    async def failing_request(self, tensors_, slot):
        sent.append(len(reads))
        if len(sent) == 3:
            while len(reads) < 3:  # fail once the third read is being encoded
                await asyncio.sleep(0.01)
            raise streaming.InferenceError("the model failed this request")
        return await request(self, tensors_, slot)

    monkeypatch.setattr(chunk_reader, "encode_batch", counting_encode)
    monkeypatch.setattr(encoding, "_column_values", slow_column_values)
    monkeypatch.setattr(RequestSender, "request", failing_request)
    streamer = make_streamer(server, manifest, "risk_scorer", "stream", "on")
    out, rej = output_part_path(tmp_path, 0), rejects_part_path(tmp_path, 0)
    with pytest.raises(streaming.InferenceError, match="the model failed this request"):
        streamer.run(manifest.chunks[0].path, out, rej)

    assert reads == [False, True, True]  # the third read, into shared memory, was the last one begun
    assert not list(Path("/dev/shm").glob(f"abi_{os.getpid()}_*")), "shared memory regions left behind"
    assert not out.exists()
    assert not rej.exists()
    assert not chunk_threads()


def test_a_restart_noticed_by_many_requests_registers_each_region_once(server) -> None:
    inputs = [InputBinding("features", "FP32", tuple(FEATURES), len(FEATURES))]
    outputs = [OutputBinding("probability", "FP32", "score", 1)]

    async def re_register() -> set[str]:
        async with TritonHook(url=server.grpc_url).get_async_client() as client:
            key = server_headers(server)
            pool = SharedMemoryPool(client, inputs, outputs, rows=64, slots=3, headers=key)
            async with pool:
                await client.unregister_system_shared_memory(headers=key)  # a restart: every region forgotten
                # Every request in flight notices at once (this raced: ALREADY_EXISTS failed the chunk).
                await asyncio.gather(*(pool.ensure_registered() for _ in range(6)))
                status = await client.get_system_shared_memory_status(headers=key, as_json=True)
                return set(status.get("regions", {}))

    regions = asyncio.run(re_register())
    assert len(regions) == 1  # one region holds the slots of every request in flight
    assert all(name.startswith(f"abi_{os.getpid()}_") for name in regions)


def test_regions_left_by_a_killed_client_are_removed(server, manifest, tmp_path) -> None:
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = Path(f"/dev/shm/abi_{dead.pid}_0badc0de_in0")
    orphan.write_bytes(b"\0" * 64)
    score(server, manifest, "risk_scorer", "stream", "on", tmp_path)
    assert not orphan.exists()


def test_shared_memory_starts_no_helper_process(server, manifest, tmp_path) -> None:
    # multiprocessing.shared_memory (which tritonclient's helpers use) starts a resource tracker, a second
    # Python process per task. The task process, fresh as Airflow starts it, must end the chunk with none.
    import subprocess
    import sys

    script = f"""
import os, pyarrow.parquet as pq
from airflow_batch_infer.client.streaming import ChunkStreamer, StreamSettings
from airflow_batch_infer.client.tensors import bind_inputs, bind_outputs
from airflow_batch_infer.hooks.triton import TritonHook
hook = TritonHook(url={server.grpc_url!r})
metadata, config = hook.get_model_metadata("risk_scorer"), hook.get_model_config("risk_scorer")
chunk = {str(manifest.chunks[0].path)!r}
streamer = ChunkStreamer(
    inputs=bind_inputs({{"features": {FEATURES!r}}}, pq.read_schema(chunk), metadata, 1024),
    outputs=bind_outputs({{"probability": "score"}}, metadata, 1024),
    settings=StreamSettings("risk_scorer", request_rows=2048, shared_memory="on"),
    row_id_column="row_id", client_factory=hook.get_async_client, url={server.grpc_url!r},
    headers={server_headers(server)!r},
)
result = streamer.run(chunk, {str(tmp_path / "out.parquet")!r}, {str(tmp_path / "rej.parquet")!r})
children = [
    p for p in os.listdir("/proc") if p.isdigit()
    and f"PPid:\\t{{os.getpid()}}\\n" in open(f"/proc/{{p}}/status").read()
]
print(result.shared_memory, result.rows_out, len(children))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["True", "20000", "0"]
