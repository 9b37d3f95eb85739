"""The shared memory region a chunk's tensors live in: a file in /dev/shm, mapped here."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from airflow_batch_infer.client.shared_memory import _Region


def test_a_region_is_a_shm_file_its_arrays_share(tmp_path) -> None:
    region = _Region("abi_test_share", 4096, shm_dir=tmp_path)
    assert region.key == "/abi_test_share"
    assert (tmp_path / "abi_test_share").stat().st_size == 4096
    values = region.array(np.dtype(np.float32), [4, 16], 64)
    values[...] = np.arange(64, dtype=np.float32).reshape(4, 16)
    again = region.array(np.dtype(np.float32), [4, 16], 64)
    np.testing.assert_array_equal(again, values)  # the same memory, not a copy
    raw = (tmp_path / "abi_test_share").read_bytes()  # what another process mapping the file sees
    np.testing.assert_array_equal(np.frombuffer(raw[64 : 64 + 256], np.float32), values.ravel())
    del values, again
    region.destroy()
    assert not (tmp_path / "abi_test_share").exists()


def test_a_region_destroyed_under_a_live_array_is_unlinked_and_the_array_stays_readable() -> None:
    # A failed chunk can leave a request's tensors alive when the pool closes. Unmapping the memory under
    # them would crash the task at the next read (a segmentation fault, not an error): the region is
    # unlinked at once and unmapped when the last array over it is gone. In a child process, so that a
    # crash fails this test only.
    code = textwrap.dedent(
        """
        import os, numpy as np
        from airflow_batch_infer.client.shared_memory import _Region
        region = _Region(f"abi_{os.getpid()}_test_live", 4096)
        values = region.array(np.dtype(np.float32), [8, 16], 0)
        values[...] = 2.0
        view = values[2:4]
        region.destroy()
        print(os.path.exists(region.path), float(values.sum()), float(view.sum()))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.split() == ["False", "256.0", "64.0"]
