"""No server outlives its run: real DAG runs (``dag.test()``), a real tritonserver and its real supervisor,
killed as a worker or an OOM killer would kill them. Each pipeline test ends with exact row counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from transactions_data import write_transactions

from airflow_batch_infer.runtimes import ServerInfo, ServerOwner, get_runtime
from tests.conftest import MODEL_REPOSITORY, REPO, processes_mentioning, task_states
from tests.dag_registry import register_dag
from tests.e2e.lifetime_dag import LOGICAL_DATE, build_dag

pytestmark = pytest.mark.e2e

ROWS = 400_000


@pytest.fixture(scope="module")
def source(airflow_db, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("transactions")
    write_transactions(path, ROWS, files=4)
    return path


def config(tmp_path: Path, source: Path, dag_id: str, **more: Any) -> dict[str, Any]:
    return {"dag_id": dag_id, "source": str(source), "table": "scores", "work": str(tmp_path), **more}


def the_server(work: Path, timeout: float = 180) -> ServerInfo:
    """The one server started under ``work`` (its ``server.json``), once it has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = list((work / "servers").glob("abi-*/server.json"))
        if records:
            return ServerInfo.from_dict(json.loads(records[0].read_text()))
        time.sleep(0.1)
    raise AssertionError(f"no server started under {work}")


def wait_mid_infer(info: ServerInfo, requests: int = 20, timeout: float = 180) -> None:
    """Return once the server has answered ``requests`` inference requests (the infer tasks stream)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{info.http_url}/v2/models/risk_scorer/stats", timeout=2) as r:
                stats = json.loads(r.read())["model_stats"][0]["inference_stats"]["success"]
            if int(stats.get("count", 0)) >= requests:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the server never answered {requests} requests")


def wait_until_gone(marker: str | Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def warehouse_rows(work: Path) -> tuple[int, int]:
    with duckdb.connect(str(work / "warehouse.duckdb"), read_only=True) as con:
        return con.execute("SELECT count(*), count(DISTINCT transaction_id) FROM scores").fetchone()


def rerun_holds_every_row_once(cfg: dict[str, Any]) -> None:
    """Run the partition again in this process: it succeeds and holds every row exactly once."""
    dag = build_dag({k: v for k, v in cfg.items() if k != "lease_timeout"})
    register_dag(dag)
    run = dag.test(logical_date=LOGICAL_DATE)
    assert run.state == "success", task_states(run)
    assert warehouse_rows(Path(cfg["work"])) == (ROWS, ROWS)
    assert processes_mentioning(Path(cfg["work"]) / "servers") == []


def run_in_child(cfg: dict[str, Any], log: Path) -> subprocess.Popen[bytes]:
    """The DAG run in a process of its own (the task runner the test will SIGKILL)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.lifetime_dag", json.dumps(cfg)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def kill_runner_mid_infer(cfg: dict[str, Any], tmp_path: Path) -> tuple[ServerInfo, float]:
    child = run_in_child(cfg, tmp_path / "runner.log")
    try:
        info = the_server(tmp_path)
        wait_mid_infer(info)
    finally:
        child.kill()
        child.wait()
    return info, time.time()


def test_sigkill_of_the_supervisor_mid_infer_leaves_no_server(source: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path, source, "lifetime_supervisor_killed")
    dag = build_dag(cfg)
    register_dag(dag)
    seen: dict[str, Any] = {}

    def kill_the_supervisor() -> None:
        info = the_server(tmp_path)
        wait_mid_infer(info)
        os.kill(info.handle["pid"], signal.SIGKILL)
        seen["left after 10 s"] = wait_until_gone(tmp_path / "servers", 10)
        seen["server_id"] = info.handle["server_id"]

    killer = threading.Thread(target=kill_the_supervisor, daemon=True)
    killer.start()
    run = dag.test(logical_date=LOGICAL_DATE)
    killer.join(timeout=60)

    assert seen["left after 10 s"] == []  # tritonserver and its stubs died with their supervisor
    states = task_states(run)
    # The run fails clearly (the server is gone and nothing restarts it) or, had every chunk been
    # scored before the kill, finishes; never a success with missing rows.
    if run.state == "failed":
        assert "failed" in states["infer"]
        assert states["persist"] == ["upstream_failed"]
        assert states["stop_server"] == ["success"]  # "already gone" is not an error
    else:
        assert run.state == "success", states
        assert warehouse_rows(tmp_path) == (ROWS, ROWS)
    rerun_holds_every_row_once(cfg)


def test_sigkill_of_the_runner_then_the_lease_stops_the_server(source: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path, source, "lifetime_runner_killed_short_lease", lease_timeout=10)
    info, killed_at = kill_runner_mid_infer(cfg, tmp_path)
    workdir = Path(info.handle["workdir"])

    # No reaper runs: the server's supervisor sees the lease run out and stops it.
    assert wait_until_gone(tmp_path / "servers", 10 + 15) == []
    stopped_at, why = (workdir / "stopped").read_text().split(" ", 1)
    assert float(stopped_at) > killed_at  # stopped because its runner died, not before
    assert "lease_timeout 10 s" in why
    rerun_holds_every_row_once(cfg)


def test_sigkill_of_the_runner_with_a_long_lease_the_reaper_stops_it_once_the_run_failed(
    source: Path, tmp_path: Path
) -> None:
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from sqlalchemy import select

    from airflow_batch_infer.operators.reaper import TritonServerReaperOperator

    cfg = config(tmp_path, source, "lifetime_runner_killed_long_lease", lease_timeout=3600)
    info, _ = kill_runner_mid_infer(cfg, tmp_path)
    runtime = get_runtime("local", work_root=str(tmp_path / "servers"))
    time.sleep(2)
    assert runtime.is_running(info)  # a long lease: the server waits for its run

    def reap(day: int) -> list[dict[str, Any]]:
        from airflow.sdk import DAG

        with DAG(f"lifetime_reaper_{day}", schedule=None, start_date=LOGICAL_DATE) as reaper_dag:
            TritonServerReaperOperator(
                task_id="reap",
                runtime="local",
                runtime_options={"work_root": str(tmp_path / "servers")},
                min_age=0,
            )
        register_dag(reaper_dag)
        run = reaper_dag.test(logical_date=LOGICAL_DATE + timedelta(days=day))
        assert run.state == "success", task_states(run)
        return run.get_task_instances()[0].xcom_pull(task_ids="reap")

    assert reap(1) == []  # its run is still "running" in Airflow: the reaper leaves it alone
    assert runtime.is_running(info)

    with create_session() as session:  # what the scheduler does once it finds the runner dead
        run = session.scalar(select(DagRun).where(DagRun.dag_id == cfg["dag_id"]))
        run.set_state(DagRunState.FAILED)

    reaped = reap(2)
    assert [r["server_id"] for r in reaped] == [info.handle["server_id"]]
    assert reaped[0]["stopped"] is True
    assert reaped[0]["reason"].endswith("is no longer queued or running (failed)")
    assert processes_mentioning(tmp_path / "servers") == []
    rerun_holds_every_row_once(cfg)


def test_a_retried_start_task_reattaches_to_the_server_it_started(airflow_db, tmp_path: Path) -> None:
    from airflow.sdk import DAG, task

    from airflow_batch_infer.operators.server import StartTritonServerOperator, StopTritonServerOperator

    options = {"work_root": str(tmp_path / "servers")}
    first_try = tmp_path / "first-try-server-id"

    class LostAfterReady(StartTritonServerOperator):
        """The first try loses its worker right after the server became ready."""

        def execute(self, context: Any) -> dict[str, Any]:
            server = super().execute(context)
            if context["ti"].try_number == 1:
                first_try.write_text(server["handle"]["server_id"])
                raise RuntimeError("worker lost after the server became ready")
            return server

    with DAG("lifetime_start_retried", schedule=None, start_date=LOGICAL_DATE) as dag:
        start = LostAfterReady(
            task_id="start_server",
            model_repository=str(MODEL_REPOSITORY),
            models=["risk_scorer"],
            runtime_options=options,
            retries=1,
            retry_delay=timedelta(0),
        )

        @task
        def count_servers() -> int:
            return len(get_runtime("local", **options).list_servers())

        stop = StopTritonServerOperator(task_id="stop_server", server=start.output, runtime_options=options)
        start >> count_servers() >> stop
        stop.as_teardown(setups=start)
    register_dag(dag)
    run = dag.test(logical_date=LOGICAL_DATE)

    assert run.state == "success", task_states(run)
    tis = {ti.task_id: ti for ti in run.get_task_instances()}
    assert tis["start_server"].try_number == 2
    server = tis["start_server"].xcom_pull(task_ids="start_server")
    assert server["handle"]["server_id"] == first_try.read_text()  # reattached, not started again
    assert tis["count_servers"].xcom_pull(task_ids="count_servers") == 1
    assert len(list((tmp_path / "servers").glob("abi-*"))) == 1
    assert processes_mentioning(tmp_path / "servers") == []


def test_reaper_dry_run_lists_the_orphan_and_the_expired_lease_not_the_live_server(
    airflow_db, tmp_path: Path
) -> None:
    from airflow.sdk import DAG, task

    from airflow_batch_infer.operators.reaper import TritonServerReaperOperator

    options = {"work_root": str(tmp_path / "servers")}
    runtime = get_runtime("local", **options)
    # A server whose run Airflow does not know (started by a run since deleted, say).
    orphan = runtime.start(
        str(MODEL_REPOSITORY), ["risk_scorer"], owner=ServerOwner("nightly", "manual__gone", "start_server")
    )
    started: list[ServerInfo] = [orphan]
    try:
        with DAG("lifetime_reaper_dry_run", schedule=None, start_date=LOGICAL_DATE) as dag:

            @task
            def start_live_server(**context) -> dict:
                return runtime.start(
                    str(MODEL_REPOSITORY), ["risk_scorer"], owner=ServerOwner.from_context(context)
                ).to_dict()

            @task
            def start_server_whose_lease_expires(**context) -> dict:
                # Owned by this live run, but its keeper hangs and nobody renewed its lease for 100 s.
                info = get_runtime("local", lease_timeout=30, **options).start(
                    str(MODEL_REPOSITORY), ["risk_scorer"], owner=ServerOwner.from_context(context)
                )
                os.kill(info.handle["pid"], signal.SIGSTOP)
                past = time.time() - 100
                os.utime(Path(info.handle["workdir"]) / "lease", (past, past))
                return info.to_dict()

            reap = TritonServerReaperOperator(
                task_id="reap", runtime="local", runtime_options=options, min_age=0, dry_run=True
            )
            [start_live_server(), start_server_whose_lease_expires()] >> reap
        register_dag(dag)
        run = dag.test(logical_date=LOGICAL_DATE)
        assert run.state == "success", task_states(run)
        tis = {ti.task_id: ti for ti in run.get_task_instances()}
        live = ServerInfo.from_dict(tis["start_live_server"].xcom_pull(task_ids="start_live_server"))
        expiring = ServerInfo.from_dict(
            tis["start_server_whose_lease_expires"].xcom_pull(task_ids="start_server_whose_lease_expires")
        )
        started += [live, expiring]
        reaped = {r["server_id"]: r for r in tis["reap"].xcom_pull(task_ids="reap")}

        assert set(reaped) == {orphan.handle["server_id"], expiring.handle["server_id"]}
        assert reaped[orphan.handle["server_id"]]["reason"] == (
            "DAG run nightly / manual__gone is no longer queued or running (unknown to Airflow)"
        )
        why = reaped[expiring.handle["server_id"]]["reason"]
        assert why.startswith("its lease expired: not renewed for 10")
        assert why.endswith("s (lease_timeout 30 s)")
        assert not any(r["stopped"] for r in reaped.values())  # a dry run stops nothing
        assert all(runtime.is_running(info) for info in (orphan, live, expiring))
    finally:
        for info in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(info.handle["pid"], signal.SIGCONT)  # the hung keeper, before stopping it
            runtime.stop(info)
    assert processes_mentioning(tmp_path / "servers") == []
