"""The partition lock on local disk: an exclusive create, released after, taken over when stale."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from airflow_batch_infer.sinks.locks import PartitionLockedError, lock_path, partition_lock


def test_one_writer_at_a_time_then_the_next(tmp_path: Path) -> None:
    table = str(tmp_path / "scores")
    with partition_lock(table, "batch_partition", "2026-11-21", description="run A") as path:
        assert json.loads(Path(path).read_text())["by"] == "run A"
        with (
            pytest.raises(PartitionLockedError, match=r"another run \(run A on "),
            partition_lock(table, "batch_partition", "2026-11-21", description="run B"),
        ):
            pass
        with partition_lock(table, "batch_partition", "2026-11-22"):  # another partition: free
            pass
        assert Path(path).exists()  # B's failure did not release A's lock
    assert not Path(path).exists()
    with partition_lock(table, "batch_partition", "2026-11-21", description="run B"):
        pass


def test_the_lock_is_released_when_the_write_fails(tmp_path: Path) -> None:
    table = str(tmp_path / "scores")
    with pytest.raises(OSError, match="disk full"), partition_lock(table, "batch_partition", "p"):
        raise OSError("disk full")
    assert not Path(lock_path(table, "batch_partition", "p")).exists()


def test_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    table = str(tmp_path / "scores")
    path = Path(lock_path(table, "batch_partition", "p"))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"token": "dead", "taken_at": time.time() - 7200, "by": "killed run"}))
    with partition_lock(table, "batch_partition", "p", timeout=3600, description="run C"):
        assert json.loads(path.read_text())["by"] == "run C"
    assert not path.exists()
