"""The streaming client and the infer operator against a real tritonserver over real gRPC."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import duckdb
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transactions_data import FEATURES, write_transactions

from airflow_batch_infer.chunk_input import ChunkInput, open_chunk
from airflow_batch_infer.client.retry import RetryPolicy
from airflow_batch_infer.client.sizing import resolve_sizes
from airflow_batch_infer.client.streaming import REASON_COLUMN, ChunkStreamer, InferenceError, StreamSettings
from airflow_batch_infer.client.tensors import ContractError, bind_inputs, bind_outputs
from airflow_batch_infer.hooks.triton import TritonHook
from airflow_batch_infer.operators.infer import TritonInferenceOperator
from airflow_batch_infer.runtimes import ServerInfo
from airflow_batch_infer.runtimes.access import server_headers
from airflow_batch_infer.sinks import get_sink
from airflow_batch_infer.staging import Manifest, output_part_path, rejects_part_path, stage_parquet
from tests.conftest import column_layouts, definition_levels

pytestmark = pytest.mark.integration

MODEL = "risk_scorer"
# Same ONNX graph, same onnxruntime kernels on both sides; batches of different sizes may round the
# last bit of a float32 differently.
ATOL = 1e-6


def reference_scores(model_repository: Path, features: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_repository / MODEL / "1" / "model.onnx"))
    return session.run(["probability"], {"features": features})[0][:, 0]


def stage(tmp_path: Path, rows: int, chunk_rows: int | None = None) -> Manifest:
    """Two input files in row groups of 5,000 rows, pinned by reference (the stage task's default)."""
    write_transactions(tmp_path / "in", rows, files=2, row_group_rows=5_000)
    return stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=chunk_rows or rows)


def chunk_of(manifest: Manifest, index: int = 0) -> ChunkInput:
    return open_chunk(manifest.chunks[index], manifest)


def chunk_table(manifest: Manifest, index: int = 0) -> pa.Table:
    """The chunk's rows, read as the infer task reads them."""
    return pa.Table.from_batches(list(chunk_of(manifest, index).iter_batches(65_536, list(manifest.schema))))


def streamer(server: ServerInfo, chunk: ChunkInput, **settings: object) -> ChunkStreamer:
    """The infer task's streamer for ``chunk``, with the server's key (its shared memory is restricted)."""
    url = server.grpc_url
    hook = TritonHook(url=url)
    metadata, config = hook.get_model_metadata(MODEL), hook.get_model_config(MODEL)
    inputs = bind_inputs({"features": FEATURES}, chunk.schema, metadata, config["max_batch_size"])
    outputs = bind_outputs({"probability": "risk_score"}, metadata, config["max_batch_size"])
    rows, in_flight = resolve_sizes(
        config, settings.pop("request_rows", None), settings.pop("max_in_flight", None)
    )
    return ChunkStreamer(
        inputs=inputs,
        outputs=outputs,
        settings=StreamSettings(MODEL, request_rows=rows, max_in_flight=in_flight, **settings),
        row_id_column="row_id",
        passthrough_columns=["transaction_id"],
        client_factory=hook.get_async_client,
        url=url,
        headers=server_headers(server),
    )


def run_chunk(s: ChunkStreamer, manifest: Manifest, index: int = 0):
    return s.run(
        chunk_of(manifest, index),
        output_part_path(manifest.run_dir, index),
        rejects_part_path(manifest.run_dir, index),
    )


@pytest.mark.parametrize("shared_memory", ["on", "off"])
def test_outputs_equal_the_model_run_directly(
    triton_server, tmp_path, model_repository, shared_memory
) -> None:
    manifest = stage(tmp_path, 60_000)
    s = streamer(triton_server, chunk_of(manifest), shared_memory=shared_memory, request_rows=4096)
    result = run_chunk(s, manifest)

    assert (result.rows, result.rows_out, result.rows_rejected) == (60_000, 60_000, 0)
    assert result.shared_memory is (shared_memory == "on")
    assert not list(Path("/dev/shm").glob(f"abi_{os.getpid()}_*")), "shared memory regions left behind"
    outputs = pq.read_table(result.output_path)
    assert outputs.column_names == ["row_id", "transaction_id", "risk_score"]
    assert outputs.column("row_id").to_pylist() == list(range(60_000))
    chunk = chunk_table(manifest)
    assert outputs.column("transaction_id").equals(chunk.column("transaction_id"))
    features = np.column_stack([chunk.column(f).to_numpy() for f in FEATURES]).astype(np.float32)
    expected = reference_scores(model_repository, features)
    np.testing.assert_allclose(outputs.column("risk_score").to_numpy(), expected, rtol=0, atol=ATOL)
    assert pq.read_metadata(result.rejects_path).num_rows == 0


def test_the_server_batches_concurrent_requests(triton_server, tmp_path) -> None:
    manifest = stage(tmp_path, 40_000)
    hook = TritonHook(url=triton_server.grpc_url)

    def counters() -> tuple[int, int]:
        stats = hook.get_inference_statistics(MODEL)["model_stats"][0]
        # Counters still at zero are left out of the statistics (protobuf JSON), as on a fresh server.
        success = stats.get("inference_stats", {}).get("success", {})
        return int(success.get("count", 0)), int(stats.get("execution_count", 0))

    for _attempt in range(2):
        requests_before, executions_before = counters()
        result = run_chunk(
            streamer(triton_server, chunk_of(manifest), request_rows=250, max_in_flight=32),
            manifest,
        )
        requests_after, executions_after = counters()
        # A retry means the server failed under the chunk and its supervisor restarted it (seen once in
        # CI: the Python backend crashed with SIGSEGV): the chunk is still whole, but the server's counters
        # began again at zero and say nothing about batching. Run the chunk again on the restarted server.
        if result.retries == 0:
            break
    assert result.rows_out == 40_000
    assert result.retries == 0, "the server failed under two runs of the chunk in a row"
    assert result.requests == requests_after - requests_before == 160
    assert executions_after - executions_before < result.requests


def test_parts_are_required_where_their_chunk_has_no_nulls_and_persist_as_one_table(
    triton_server, tmp_path
) -> None:
    rows = 6_000
    write_transactions(tmp_path / "in", rows, files=2)
    second = sorted((tmp_path / "in").glob("*.parquet"))[1]
    table = pq.read_table(second)
    ids = table.column("transaction_id").to_pylist()
    ids[::10] = [None] * len(ids[::10])  # the second file, so the second chunk, has null passthroughs
    pq.write_table(table.set_column(0, "transaction_id", pa.array(ids, pa.int64())), second)
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=rows // 2)
    results = [
        run_chunk(streamer(triton_server, chunk_of(manifest, chunk.index)), manifest, chunk.index)
        for chunk in manifest.chunks
    ]

    # Row ids and scores are never null; the passthrough is REQUIRED where its chunk held no null. A part
    # on local disk is read once by the persist task: stored uncompressed.
    parts = [r.output_path for r in results]
    assert [definition_levels(p) for p in parts] == [
        {"row_id": 0, "transaction_id": 0, "risk_score": 0},
        {"row_id": 0, "transaction_id": 1, "risk_score": 0},
    ]
    assert {codec for p in parts for codec, _ in column_layouts(p).values()} == {"UNCOMPRESSED"}
    database = tmp_path / "w.duckdb"
    persisted = get_sink("duckdb", table="scores", database=str(database)).replace_partition(
        "2026-11-30", parts, [r.rejects_path for r in results]
    )
    assert (persisted.rows, persisted.rejected) == (rows, 0)
    with duckdb.connect(str(database), read_only=True) as con:
        stored = con.execute("SELECT row_id, transaction_id FROM scores ORDER BY row_id").fetchall()
    source = pq.read_table(tmp_path / "in").column("transaction_id").to_pylist()
    assert [row_id for row_id, _ in stored] == list(range(rows))
    assert [transaction_id for _, transaction_id in stored] == source
    assert sum(t is None for t in source) == 300


def test_bad_rows_are_set_aside_with_a_reason_and_the_rest_scored(
    triton_server, tmp_path, model_repository
) -> None:
    rows = 5_000
    write_transactions(tmp_path / "in", rows, files=1)
    table = pq.read_table(tmp_path / "in")
    f03 = table.column("f03").to_numpy().copy()
    f07 = table.column("f07").to_pylist()
    f03[[10, 4000]] = [np.nan, np.inf]
    f07[20] = None
    table = table.set_column(table.schema.get_field_index("f03"), "f03", pa.array(f03))
    table = table.set_column(table.schema.get_field_index("f07"), "f07", pa.array(f07, pa.float32()))
    (tmp_path / "bad").mkdir()
    pq.write_table(table, tmp_path / "bad" / "part.parquet")
    manifest = stage_parquet(tmp_path / "bad", tmp_path / "run", chunk_rows=rows)

    result = run_chunk(streamer(triton_server, chunk_of(manifest), request_rows=1000), manifest)

    assert (result.rows_out, result.rows_rejected) == (rows - 3, 3)
    rejects = pq.read_table(result.rejects_path).to_pydict()
    assert dict(zip(rejects["row_id"], rejects[REASON_COLUMN], strict=True)) == {
        10: "NaN or infinite value in column 'f03'",
        20: "null in column 'f07'",
        4000: "NaN or infinite value in column 'f03'",
    }
    assert rejects["transaction_id"] == [10_000_010, 10_000_020, 10_004_000]
    outputs = pq.read_table(result.output_path)
    ids = outputs.column("row_id").to_numpy()
    assert sorted(set(ids) | {10, 20, 4000}) == list(range(rows))
    features = np.column_stack([table.column(f).to_numpy(zero_copy_only=False) for f in FEATURES])[ids]
    expected = reference_scores(model_repository, features.astype(np.float32))
    np.testing.assert_allclose(outputs.column("risk_score").to_numpy(), expected, rtol=0, atol=ATOL)


def test_an_unreachable_server_fails_after_retries_and_leaves_no_part(triton_server, tmp_path) -> None:
    manifest = stage(tmp_path, 2_000)
    s = streamer(triton_server, chunk_of(manifest), retry=RetryPolicy(max_attempts=3, initial_wait=0.05))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    s.client_factory = TritonHook(url=f"127.0.0.1:{closed_port}").get_async_client

    with pytest.raises(InferenceError, match=r"did not answer .* after 3 attempts .*StatusCode.UNAVAILABLE"):
        run_chunk(s, manifest)
    assert not list((Path(manifest.run_dir) / "outputs").iterdir())
    assert not list((Path(manifest.run_dir) / "rejects").iterdir())


def test_the_mapping_is_checked_against_the_served_model(triton_server, tmp_path) -> None:
    manifest = stage(tmp_path, 100)
    chunk = manifest.chunks[0].to_dict()
    operator = TritonInferenceOperator(
        task_id="infer",
        chunk=chunk,
        server=triton_server.to_dict(),
        model_name=MODEL,
        inputs={"features": FEATURES[:15]},
    )
    with pytest.raises(
        ContractError, match=r"'features' of model 'risk_scorer' takes 16 values a row .* but 15"
    ):
        operator.execute({})

    unknown = TritonInferenceOperator(
        task_id="infer",
        chunk=chunk,
        server=triton_server.to_dict(),
        model_name="fraud_v9",
        inputs={"x": "f00"},
    )
    with pytest.raises(
        RuntimeError, match=r"'fraud_v9' .* is not available .* Models in its repository: \[.*'risk_scorer'"
    ):
        unknown.execute({})


@pytest.mark.parametrize(("compress_parts", "codec"), [(None, "UNCOMPRESSED"), (True, "SNAPPY")])
def test_the_operator_scores_its_chunk(triton_server, tmp_path, compress_parts, codec) -> None:
    manifest = stage(tmp_path, 30_000, chunk_rows=10_000)
    operator = TritonInferenceOperator(
        task_id="infer",
        chunk=manifest.chunks[1].to_dict(),
        server=triton_server.to_dict(),
        model_name=MODEL,
        inputs={"features": FEATURES},
        outputs={"probability": "risk_score"},
        compress_parts=compress_parts,
    )
    result = operator.execute({})
    assert (result["index"], result["rows_out"], result["rows_rejected"]) == (1, 10_000, 0)
    ids = pq.read_table(result["output_path"]).column("row_id").to_pylist()
    assert ids == list(range(10_000, 20_000))
    # Local parts are stored uncompressed unless asked for (a sink whose table is the parts asks).
    assert pq.read_metadata(result["output_path"]).row_group(0).column(0).compression == codec


def test_a_retry_removes_what_a_killed_attempt_left_and_rewrites_its_chunk(triton_server, tmp_path) -> None:
    manifest = stage(tmp_path, 5_000)
    final = output_part_path(manifest.run_dir, 0)
    final.parent.mkdir(parents=True, exist_ok=True)
    leftover = final.with_name(f".{final.name}.deadbeef.tmp")  # as a SIGKILLed attempt leaves it
    leftover.write_bytes(b"half a parquet file")
    final.write_bytes(b"an older attempt's part")

    result = run_chunk(streamer(triton_server, chunk_of(manifest)), manifest)

    assert not leftover.exists()
    assert pq.read_metadata(result.output_path).num_rows == result.rows_out == 5_000
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]
