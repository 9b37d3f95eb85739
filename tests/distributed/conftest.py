"""The Celery cluster the distributed tests share (started once per module, always stopped)."""

from __future__ import annotations

import atexit
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from tests.distributed.cluster import CeleryCluster, services_missing


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[CeleryCluster]:
    """Airflow with the CeleryExecutor, two workers, PostgreSQL and Redis; stopped (and its database dropped)
    after the module, also when a test or the start fails, or pytest gets SIGTERM."""
    missing = services_missing()
    if missing:
        pytest.skip(f"the distributed tests need PostgreSQL and Redis: {missing}")
    root = Path(tempfile.mkdtemp(prefix="abi-celery-"))
    cluster = CeleryCluster(root)
    atexit.register(cluster.stop)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(root, ignore_errors=True)
