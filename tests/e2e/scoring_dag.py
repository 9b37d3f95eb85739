"""A test DAG of one ``batch_inference`` group: ``risk_scorer`` over a test's own folders, for dag.test()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pendulum
from transactions_data import FEATURES

from tests.conftest import MODEL_REPOSITORY
from tests.dag_registry import register_dag

LOGICAL_DATE = pendulum.datetime(2026, 11, 21, tz="UTC")


def scoring_dag(dag_id: str, tmp_path: Path, **options: Any) -> Any:
    """A registered DAG whose ``batch_inference`` group scores with ``risk_scorer`` (16 features), staging,
    serving and writing under ``tmp_path`` (``staging/``, ``servers/``, ``w.duckdb``).

    :param dag_id: the DAG's id.
    :param tmp_path: the test's folder.
    :param options: ``batch_inference`` arguments, added to these or replacing them.
    """
    from airflow.sdk import DAG

    from airflow_batch_infer.task_group import batch_inference

    arguments = {
        "model_name": "risk_scorer",
        "model_repository": MODEL_REPOSITORY,
        "inputs": {"features": FEATURES},
        "staging_root": str(tmp_path / "staging"),
        "runtime_options": {"work_root": str(tmp_path / "servers")},
        "sink_options": {"database": str(tmp_path / "w.duckdb")},
    }
    with DAG(dag_id=dag_id, schedule=None, start_date=LOGICAL_DATE) as dag:
        batch_inference(**(arguments | options))
    register_dag(dag)
    return dag
