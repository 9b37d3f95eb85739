"""Time the start_server and stop_server tasks of a small batch_inference DAG run by ``dag.test()``.

    AIRFLOW_HOME=/tmp/abi-times/airflow BATCH_INFER_HOME=/tmp/abi-times/home \\
        .venv/bin/airflow db migrate && .venv/bin/python scripts/server_task_times.py --rounds 3

Each round runs the whole pipeline (stage, start, infer, persist, stop) on 50,000 rows in one process and
prints the two tasks' durations as Airflow recorded them (the first round pays the process's imports).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    sys.path[:0] = [str(REPO / "dags"), str(REPO)]
    import pendulum
    from airflow.sdk import DAG
    from transactions_data import FEATURES, write_transactions

    from airflow_batch_infer.task_group import batch_inference
    from tests.dag_registry import register_dag

    work = Path(tempfile.mkdtemp(prefix="abi-task-times-"))
    write_transactions(work / "in", args.rows, files=1)
    logical_date = pendulum.datetime(2026, 11, 21, tz="UTC")
    for i in range(args.rounds):
        with DAG(f"server_task_times_{os.getpid()}", schedule=None, start_date=logical_date) as dag:
            batch_inference(
                source=str(work / "in"),
                model_name="risk_scorer",
                model_repository=REPO / "triton_models",
                inputs={"features": FEATURES},
                table="scores",
                chunk_rows=max(1, args.rows // 2),
                staging_root=str(work / "staging"),
                runtime_options={"work_root": str(work / "servers")},
                sink_options={"database": str(work / "warehouse.duckdb")},
            )
        register_dag(dag)
        run = dag.test(logical_date=logical_date)
        took = {
            ti.task_id.split(".")[-1]: (ti.end_date - ti.start_date).total_seconds()
            for ti in run.get_task_instances()
            if ti.task_id.endswith(("start_server", "stop_server"))
        }
        print(
            f"round {i}: run {run.state}, start_server {took['start_server']:.2f} s, "
            f"stop_server {took['stop_server']:.2f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
