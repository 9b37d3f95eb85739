"""One run over two real local Triton servers: the start operator starts both at once, the infer operator
spreads chunks over them and moves a chunk off a server that was SIGKILLed mid-chunk (its keeper's restart
disabled), the stop operator stops both and reports what each did. Rows are exact."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from transactions_data import FEATURES, write_transactions

from airflow_batch_infer.hooks.triton import TritonHook
from airflow_batch_infer.operators.infer import TritonInferenceOperator
from airflow_batch_infer.operators.server import StartTritonServerOperator, StopTritonServerOperator
from airflow_batch_infer.runtimes.fleet import fleet_servers
from airflow_batch_infer.staging import stage_parquet
from tests.conftest import MODEL_REPOSITORY, processes_mentioning

ROWS = 240_000


class TaskInstance(SimpleNamespace):
    """What the operators read of a task instance (its identity, and XCom pushes)."""

    def xcom_push(self, key: str, value: object) -> None:
        self.pushed[key] = value


def context() -> dict:
    ti = TaskInstance(
        dag_id="scale_out", run_id="manual__2026-12-06", task_id="start_server", map_index=-1, pushed={}
    )
    return {"ti": ti}


@pytest.fixture
def fleet(tmp_path: Path):
    start = StartTritonServerOperator(
        task_id="start_server",
        model_repository=str(MODEL_REPOSITORY),
        models=["risk_scorer"],
        runtime_options={"work_root": str(tmp_path / "servers"), "max_restarts": 0},
        servers=2,
    )
    started = time.monotonic()
    fleet = json.loads(json.dumps(start.execute(context())))  # as the infer tasks get it from XCom
    fleet["start_seconds"] = time.monotonic() - started
    yield fleet
    StopTritonServerOperator(task_id="stop_server", server=fleet).execute({})


def tritonserver_pid(server_id: str) -> int:
    for pid in processes_mentioning(f"--id={server_id}"):
        if Path(f"/proc/{pid}/exe").resolve().name == "tritonserver":
            return pid
    raise AssertionError(f"no tritonserver process of {server_id}")


def infer(fleet: dict, chunk: dict, **options: object) -> dict:
    return TritonInferenceOperator(
        task_id="infer",
        chunk=chunk,
        server=fleet,
        model_name="risk_scorer",
        inputs={"features": FEATURES},
        outputs={"probability": "risk_score"},
        **options,
    ).execute({})


def test_two_servers_each_serve_chunks_and_stop_reports_both(fleet: dict, tmp_path: Path) -> None:
    servers = fleet_servers(fleet)
    assert len(servers) == 2
    assert len({s.grpc_url for s in servers}) == 2  # each its own endpoint
    assert [s.handle["owner"]["replica"] for s in servers] == [0, 1]
    write_transactions(tmp_path / "in", 80_000, files=4, row_group_rows=10_000)
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=10_000)
    assert len(manifest.chunks) == 8
    results = [infer(fleet, chunk.to_dict()) for chunk in manifest.chunks]

    by_server = {s.handle["server_id"]: 0 for s in servers}
    for result in results:
        by_server[result["server"]] += result["rows_out"]
    assert by_server == {s.handle["server_id"]: 40_000 for s in servers}  # round robin by chunk
    ids = [i for r in results for i in pq.read_table(r["output_path"]).column("row_id").to_pylist()]
    assert sorted(ids) == list(range(80_000))

    ti = context()["ti"]
    assert StopTritonServerOperator(task_id="stop_server", server=fleet).execute({"ti": ti}) is True
    report = {r["server_id"]: r for r in ti.pushed["servers"]}
    assert {k: v["inference_count"] for k, v in report.items()} == by_server  # each server's own statistics
    assert all(processes_mentioning(s.handle["server_id"]) == [] for s in servers)


def test_a_chunk_moves_to_the_other_server_when_its_own_is_killed(
    fleet: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first, second = fleet_servers(fleet)
    write_transactions(tmp_path / "in", ROWS, files=1)
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=ROWS)
    chunk = manifest.chunks[0].to_dict() | {"index": 1}  # chunk 1 goes to the second server first
    victim = second.handle["server_id"]
    hook = TritonHook(url=second.grpc_url)

    def kill_mid_chunk() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = hook.get_inference_statistics("risk_scorer")["model_stats"][0]
            if int(stats["inference_stats"]["success"].get("count", 0)) >= 20:
                os.kill(tritonserver_pid(victim), signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_mid_chunk, daemon=True)
    killer.start()
    result = infer(fleet, chunk, request_rows=512, max_in_flight=1, retry_attempts=2)
    killer.join(timeout=5)

    assert result["server"] == first.handle["server_id"]
    assert result["moved_from"] == [victim]
    assert f"Chunk 1 moves from Triton server {victim}" in capsys.readouterr().out  # the task's log
    assert (result["rows_out"], result["rows_rejected"]) == (ROWS, 0)
    ids = pq.read_table(result["output_path"]).column("row_id").to_pylist()
    assert sorted(ids) == list(range(ROWS))
