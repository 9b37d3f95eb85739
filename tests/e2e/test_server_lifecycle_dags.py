"""The server's life around a DAG run, run by Airflow itself (``dag.test()``) with a real local tritonserver.

A deferrable start (the trigger run by Airflow), and the orphan reaper asking Airflow for DAG run states
through the task SDK.
"""

from __future__ import annotations

from pathlib import Path

import pendulum
import pytest

from airflow_batch_infer.runtimes import ServerInfo, ServerOwner, get_runtime
from tests.conftest import MODEL_REPOSITORY, processes_mentioning, task_states
from tests.dag_registry import register_dag

pytestmark = pytest.mark.e2e

LOGICAL_DATE = pendulum.datetime(2026, 11, 21, tz="UTC")


@pytest.fixture(scope="module")
def dag_bundles(airflow_db):
    """A migrated metadata DB (``register_dag`` files the DAGs under the configured bundle)."""


def test_deferrable_start_waits_in_the_trigger_then_teardown_stops(dag_bundles, tmp_path: Path) -> None:
    from airflow.sdk import DAG

    from airflow_batch_infer.operators.server import StartTritonServerOperator, StopTritonServerOperator

    options = {"work_root": str(tmp_path / "servers"), "startup_timeout": 60}
    with DAG("deferrable_server_e2e", schedule=None, start_date=LOGICAL_DATE) as dag:
        start = StartTritonServerOperator(
            task_id="start_server",
            model_repository=str(MODEL_REPOSITORY),
            models=["risk_scorer"],
            runtime_options=options,
            deferrable=True,
            poll_interval=0.2,
        )
        stop = StopTritonServerOperator(task_id="stop_server", server=start.output, runtime_options=options)
        start >> stop
        stop.as_teardown(setups=start)
    register_dag(dag)
    run = dag.test(logical_date=LOGICAL_DATE)
    assert run.state == "success", task_states(run)
    start_ti = next(ti for ti in run.get_task_instances() if ti.task_id == "start_server")
    info = ServerInfo.from_dict(start_ti.xcom_pull(task_ids="start_server"))
    assert info.grpc_url.startswith("127.0.0.1:")
    assert ServerOwner.from_dict(info.handle["owner"]) == ServerOwner(
        "deferrable_server_e2e", run.run_id, "start_server", -1
    )
    assert start_ti.xcom_pull(task_ids="stop_server") is True
    assert processes_mentioning(tmp_path) == []


def test_reaper_stops_servers_whose_run_ended_and_spares_live_ones(dag_bundles, tmp_path: Path) -> None:
    from airflow.sdk import DAG, task

    from airflow_batch_infer.operators.reaper import TritonServerReaperOperator

    options = {"work_root": str(tmp_path / "servers"), "startup_timeout": 60}
    runtime = get_runtime("local", **options)
    orphan = runtime.start(
        str(MODEL_REPOSITORY), ["risk_scorer"], owner=ServerOwner("nightly", "manual__gone", "start_server")
    )
    live: dict = {}
    try:
        with DAG("reaper_e2e", schedule=None, start_date=LOGICAL_DATE) as dag:

            @task
            def start_live_server(**context) -> dict:
                # A server owned by this (running) DAG run: the reaper must leave it alone.
                info = get_runtime("local", **options).start(
                    str(MODEL_REPOSITORY), ["risk_scorer"], owner=ServerOwner.from_context(context)
                )
                return info.to_dict()

            reap = TritonServerReaperOperator(
                task_id="reap", runtime="local", runtime_options=options, min_age=0
            )
            start_live_server() >> reap
        register_dag(dag)
        run = dag.test(logical_date=LOGICAL_DATE)
        assert run.state == "success", task_states(run)
        tis = {ti.task_id: ti for ti in run.get_task_instances()}
        live = tis["start_live_server"].xcom_pull(task_ids="start_live_server")
        reaped = tis["reap"].xcom_pull(task_ids="reap")

        assert [r["server_id"] for r in reaped] == [orphan.handle["server_id"]]
        assert reaped[0]["stopped"] is True
        assert "nightly / manual__gone is no longer queued or running" in reaped[0]["reason"]
        assert not runtime.is_running(orphan)
        assert runtime.is_running(ServerInfo.from_dict(live))  # its run was running when the reaper ran
    finally:
        for info in (orphan, *([ServerInfo.from_dict(live)] if live else [])):
            runtime.stop(info)
    assert processes_mentioning(tmp_path) == []


def test_old_run_folders_go_unless_their_run_still_runs_or_is_the_partitions_latest_commit(
    dag_bundles, tmp_path: Path
) -> None:
    from datetime import datetime, timedelta, timezone

    import pyarrow as pa
    import pyarrow.parquet as pq
    from airflow.sdk import DAG, task

    from airflow_batch_infer.operators.retention import StagingRetentionOperator
    from airflow_batch_infer.staging import SUMMARY, run_directory, stage_parquet, write_json_atomically

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"x": [1.0, 2.0]}), tmp_path / "in" / "a.parquet")
    root = tmp_path / "staging"

    def old_folder(run_id: str, days: float, committed: bool) -> Path:
        run_dir = Path(run_directory(root, "retention_e2e", "2026-11-01", run_id))
        run = {"dag_id": "retention_e2e", "run_id": run_id, "partition": "2026-11-01"}
        manifest = stage_parquet(tmp_path / "in", run_dir, run=run).to_dict()
        manifest["created_at"] = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat()
        write_json_atomically(run_dir / "manifest.json", manifest)
        if committed:
            write_json_atomically(run_dir / SUMMARY, {"rows": 2})
        return run_dir

    superseded = old_folder("scheduled__gone_1", days=30, committed=True)  # Airflow never heard of it
    latest = old_folder("scheduled__gone_2", days=20, committed=True)

    with DAG("retention_e2e", schedule=None, start_date=LOGICAL_DATE) as dag:

        @task
        def old_folder_of_this_run(**context) -> str:
            # A long run's own folder, staged 10 days ago: its run is running, so it stays.
            return str(old_folder(context["run_id"], days=10, committed=False))

        retain = StagingRetentionOperator(task_id="retain", staging_root=str(root), retention_days=7)
        old_folder_of_this_run() >> retain
    register_dag(dag)
    run = dag.test(logical_date=LOGICAL_DATE)

    assert run.state == "success", task_states(run)
    tis = {ti.task_id: ti for ti in run.get_task_instances()}
    own = Path(tis["old_folder_of_this_run"].xcom_pull(task_ids="old_folder_of_this_run"))
    removed = tis["retain"].xcom_pull(task_ids="retain")
    assert [Path(r["path"]) for r in removed] == [superseded]
    assert "unknown to Airflow, a later committed run replaced it" in removed[0]["reason"]
    assert not superseded.exists()
    assert latest.exists()
    assert own.exists()
