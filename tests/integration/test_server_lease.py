"""A local server's lease, with a real tritonserver and its real supervisor: renewed, it lives; left alone,
its supervisor stops it (no reaper, no Airflow)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from airflow_batch_infer.runtimes import ServerInfo, get_runtime
from airflow_batch_infer.runtimes.lease import renew
from tests.conftest import MODEL_REPOSITORY, processes_mentioning

pytestmark = pytest.mark.integration


def _wait_until_gone(marker: str | Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_renewed_it_lives_left_alone_its_supervisor_stops_it(tmp_path: Path) -> None:
    runtime = get_runtime("local", work_root=str(tmp_path / "servers"), lease_timeout=3)
    info = runtime.start(str(MODEL_REPOSITORY), ["risk_scorer"])
    server = json.loads(json.dumps(info.to_dict()))  # what an infer task gets through XCom
    workdir = Path(info.handle["workdir"])
    try:
        assert json.loads((workdir / "lease").read_text())["timeout"] == 3
        # Renewed every second for three lease periods: still serving.
        for _ in range(9):
            assert renew(server) is True
            time.sleep(1)
        assert runtime.is_running(info)

        # No renewal any more: the supervisor stops the server, no reaper involved.
        assert _wait_until_gone(tmp_path, 3 + 10) == []
        stopped = (workdir / "stopped").read_text()
        assert "lease not renewed for" in stopped
        assert "lease_timeout 3 s" in stopped
        assert "lease expired" in (workdir / "server.log").read_text()
        assert not (workdir / "models").exists()
        assert list(Path("/dev/shm").glob(f"{info.handle['shm_prefix']}*")) == []
        assert renew(server) is False  # says so, does not raise
        assert runtime.stop(ServerInfo.from_dict(server)) is False
    finally:
        runtime.stop(info)
    assert processes_mentioning(tmp_path) == []


def test_no_lease_when_lease_timeout_is_zero(tmp_path: Path) -> None:
    runtime = get_runtime("local", work_root=str(tmp_path / "servers"), lease_timeout=0)
    info = runtime.start(str(MODEL_REPOSITORY), ["risk_scorer"])
    try:
        assert not (Path(info.handle["workdir"]) / "lease").exists()
        assert renew(info) is False
        assert runtime.is_running(info)
    finally:
        assert runtime.stop(info) is True
    assert processes_mentioning(tmp_path) == []
