"""The memory pool a chunk is streamed with: jemalloc inside the block, the previous default after it."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from airflow_batch_infer.client.memory_pool import reusing_memory_pool


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
