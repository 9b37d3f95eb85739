"""A small pipeline DAG for the server-lifetime tests, built the same way in the test process and in a
child process that a test SIGKILLs mid-infer (``python -m tests.e2e.lifetime_dag CONFIG_JSON``).

Slow on purpose: small requests, one in flight, so that a test can act while the infer tasks stream.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pendulum

from tests.dag_registry import register_dag

REPO = Path(__file__).resolve().parents[2]
LOGICAL_DATE = pendulum.datetime(2026, 11, 21, tz="UTC")


def build_dag(config: dict[str, Any]):
    """The DAG: ``config`` has dag_id, source, table, work (a folder), and optionally lease_timeout."""
    if str(REPO / "dags") not in sys.path:
        sys.path.insert(0, str(REPO / "dags"))
    from airflow.sdk import DAG
    from transactions_data import FEATURES

    from airflow_batch_infer.task_group import batch_inference

    work = Path(config["work"])
    start_options = {}
    if config.get("lease_timeout") is not None:
        start_options["lease_timeout"] = config["lease_timeout"]
    with DAG(config["dag_id"], schedule=None, start_date=LOGICAL_DATE) as dag:
        batch_inference(
            source=config["source"],
            model_name="risk_scorer",
            model_repository=REPO / "triton_models",
            inputs={"features": FEATURES},
            outputs={"probability": "risk_score"},
            passthrough_columns=["transaction_id"],
            table=config["table"],
            chunk_rows=config.get("chunk_rows", 100_000),
            request_rows=config.get("request_rows", 512),
            max_in_flight=1,
            infer_retries=0,
            staging_root=str(work / "staging"),
            runtime_options={"work_root": str(work / "servers")},
            start_options=start_options,
            sink_options={"database": str(work / "warehouse.duckdb")},
        )
    return dag


def main() -> None:
    dag = build_dag(json.loads(sys.argv[1]))
    register_dag(dag)
    run = dag.test(logical_date=LOGICAL_DATE)
    print(f"run {run.run_id} ended {run.state}", flush=True)


if __name__ == "__main__":
    main()
