"""The Arrow memory pool a chunk is streamed with: one that keeps freed pages for reuse."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import pyarrow as pa

_lock = threading.Lock()
_users = 0
_previous: pa.MemoryPool | None = None


def chosen_by_user() -> bool:
    """Whether the process was started with ``ARROW_DEFAULT_MEMORY_POOL`` set: the pool is then left alone."""
    return bool(os.environ.get("ARROW_DEFAULT_MEMORY_POOL"))


@contextlib.contextmanager
def reusing_memory_pool() -> Iterator[pa.MemoryPool]:
    """Make jemalloc Arrow's default memory pool inside the block, then restore the one before.

    A chunk is read, decoded and written as thousands of buffers of a few hundred kilobytes, each freed
    a moment after it is filled. jemalloc, as Arrow configures it, keeps freed pages for about a second and
    hands them out again. With mimalloc, pyarrow's default on Linux, about a fifth of the client's CPU went
    to the kernel zeroing freshly faulted pages (``perf`` on ``benchmarks/throughput.py``'s worker): with
    jemalloc the client spends about a fifth less CPU per row.

    Nested and concurrent blocks share the pool; the last one out restores the previous default. Where
    pyarrow was built without jemalloc, or ``ARROW_DEFAULT_MEMORY_POOL`` names a pool, nothing changes.
    """
    global _users, _previous
    if chosen_by_user():
        yield pa.default_memory_pool()
        return
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        yield pa.default_memory_pool()
        return
    with _lock:
        if _users == 0:
            _previous = pa.default_memory_pool()
            pa.set_memory_pool(pool)
        _users += 1
    try:
        yield pool
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _previous is not None:
                pa.set_memory_pool(_previous)
                _previous = None
