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


def test_an_infer_task_keeps_its_servers_lease_while_it_streams(tmp_path: Path) -> None:
    from transactions_data import FEATURES, write_transactions

    from airflow_batch_infer.operators.infer import TritonInferenceOperator
    from airflow_batch_infer.staging import stage_parquet

    lease = 2
    runtime = get_runtime("local", work_root=str(tmp_path / "servers"), lease_timeout=lease)
    info = runtime.start(str(MODEL_REPOSITORY), ["risk_scorer"])
    server = json.loads(json.dumps(info.to_dict()))
    workdir = Path(info.handle["workdir"])
    write_transactions(tmp_path / "in", 6_000, files=1)
    chunk = stage_parquet(tmp_path / "in", tmp_path / "run").chunks[0].to_dict()
    # One 5-row request at a time, each waiting out the batcher's 2 ms delay: longer than the lease.
    operator = TritonInferenceOperator(
        task_id="infer",
        chunk=chunk,
        server=server,
        model_name="risk_scorer",
        inputs={"features": FEATURES},
        request_rows=5,
        max_in_flight=1,
        lease_renew_interval=0.3,
    )
    try:
        started = time.monotonic()
        result = operator.execute({})
        streamed = time.monotonic() - started
        assert streamed > lease, f"the chunk took {streamed:.1f} s: too short to outlast the lease"
        assert (result["rows_out"], result["rows_rejected"]) == (6_000, 0)
        assert runtime.is_running(info)
        assert not (workdir / "stopped").exists()
        # Nobody renews it any more: gone within the lease and the supervisor's check.
        assert _wait_until_gone(tmp_path / "servers", lease + 10) == []
        assert "lease not renewed for" in (workdir / "stopped").read_text()
    finally:
        runtime.stop(info)
