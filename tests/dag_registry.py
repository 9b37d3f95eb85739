"""Serializing a DAG built outside the DAGs folder, as ``dag.test()`` needs: shared by the tests' conftest,
the child process of the lifetime tests and ``scripts/server_task_times.py`` (importing it sets no
environment, unlike ``tests/conftest.py``)."""

from __future__ import annotations

from typing import Any


def register_dag(dag: Any) -> None:
    """Serialize ``dag`` into the metadata database under the ``dags-folder`` bundle."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()  # the "dags-folder" bundle the DAG is filed under
    bag = DagBag(collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
