"""The memory pool a chunk is streamed with: jemalloc inside the block, the previous default after it."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_batch_infer.client.memory_pool import reusing_memory_pool
from airflow_batch_infer.parquet_files import open_parquet


@pytest.fixture(autouse=True)
def jemalloc_built(monkeypatch) -> None:
    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow is built without jemalloc")
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)


def test_arrow_allocates_from_jemalloc_inside_the_block_and_from_the_previous_pool_after() -> None:
    before = pa.default_memory_pool()
    jemalloc = pa.jemalloc_memory_pool()
    with reusing_memory_pool() as pool:
        assert pa.default_memory_pool().backend_name == pool.backend_name == "jemalloc"
        allocated = jemalloc.total_bytes_allocated()
        array = pa.array(range(100_000))
        assert jemalloc.total_bytes_allocated() - allocated >= array.nbytes
    assert pa.default_memory_pool().backend_name == before.backend_name
    assert array.sum().as_py() == sum(range(100_000))  # a buffer from the block outlives it


def test_overlapping_blocks_restore_the_previous_pool_once_the_last_one_ends() -> None:
    before = pa.default_memory_pool().backend_name
    inside, leave_first = threading.Event(), threading.Event()
    seen_by_other = []

    def other_chunk() -> None:
        with reusing_memory_pool():
            inside.set()
            leave_first.wait(10)
        seen_by_other.append(pa.default_memory_pool().backend_name)

    with reusing_memory_pool():
        thread = threading.Thread(target=other_chunk)
        thread.start()
        assert inside.wait(10)
        leave_first.set()
        thread.join(10)
        assert seen_by_other == ["jemalloc"]  # this block still holds the pool
        assert pa.default_memory_pool().backend_name == "jemalloc"
    assert pa.default_memory_pool().backend_name == before


def test_a_pool_chosen_with_arrow_default_memory_pool_is_left_alone(monkeypatch) -> None:
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "system")
    before = pa.default_memory_pool().backend_name
    with reusing_memory_pool() as pool:
        assert pool.backend_name == pa.default_memory_pool().backend_name == before


def test_a_chunk_opened_inside_the_block_is_read_into_its_pool_not_arrows_process_wide_one(tmp_path) -> None:
    # Given a path, pyarrow reads through its local filesystem, whose buffers come from Arrow's process-wide
    # pool (mimalloc), which pa.set_memory_pool does not change: each row group then faults in fresh pages.
    try:
        mimalloc = pa.mimalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow is built without mimalloc")
    rng = np.random.default_rng(7)
    table = pa.table({f"f{i}": rng.random(200_000, dtype=np.float32) for i in range(4)})
    path = tmp_path / "chunk.parquet"
    pq.write_table(table, path, compression="none", use_dictionary=False, row_group_size=50_000)
    with reusing_memory_pool() as pool:
        from_pool, from_mimalloc = pool.total_bytes_allocated(), mimalloc.total_bytes_allocated()
        read = pa.Table.from_batches(open_parquet(path).iter_batches(batch_size=50_000, use_threads=False))
        assert mimalloc.total_bytes_allocated() - from_mimalloc < table.nbytes // 10
        # The file's column chunks, then the columns decoded from them.
        assert pool.total_bytes_allocated() - from_pool >= 2 * table.nbytes
    assert read.equals(table)
