"""Errors that a retry cannot fix, checks at the run's start, limit_rows and validate_only, run by Airflow
(``dag.test()``) with a real tritonserver and a real DuckDB warehouse."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import duckdb
import pytest
from transactions_data import write_transactions

from airflow_batch_infer.operators.infer import TritonInferenceOperator
from tests.conftest import load_dag, processes_mentioning, task_states
from tests.e2e.scoring_dag import LOGICAL_DATE, scoring_dag

pytestmark = pytest.mark.e2e


class CheckedOnlyByTheServer(TritonInferenceOperator):
    """An infer operator that adapts to the served model (as the LLM one does), so the stage task leaves
    its mapping to the infer tasks: the mapping then fails there, against the server's metadata."""

    def prepare_for_model(self, metadata: Any, config: Any) -> None:
        return None


def _instances(run, task: str) -> list[Any]:
    return [ti for ti in run.get_task_instances() if ti.task_id.split(".")[-1] == task]


def test_a_mapping_the_model_cannot_take_fails_its_infer_task_once(airflow_db, tmp_path) -> None:
    write_transactions(tmp_path / "in", 6_000, files=1, row_group_rows=2_000)
    dag = scoring_dag(
        "e2e_no_retry",
        tmp_path,
        source=str(tmp_path / "in"),
        outputs={"probabilty": "risk_score"},  # misspelt: the model's output is "probability"
        table="never_written",
        chunk_rows=2_000,
        infer_retries=2,
        infer_operator=CheckedOnlyByTheServer,
        infer_options={"retry_delay": timedelta(seconds=1)},  # a retry, if any, would come at once
    )

    started = time.monotonic()
    run = dag.test(logical_date=LOGICAL_DATE)
    seconds = time.monotonic() - started

    states = task_states(run)
    assert run.state == "failed", states
    infer = _instances(run, "infer")
    assert [(ti.state, ti.try_number) for ti in infer] == [("failed", 1)] * 3, states
    assert states["persist"] == ["upstream_failed"]
    assert states["start_server"] == ["success"]
    assert states["stop_server"] == ["success"]
    assert processes_mentioning(tmp_path / "servers") == []
    assert not (tmp_path / "w.duckdb").exists()
    assert seconds < 120, f"the failed run took {seconds:.0f} s"


def test_a_wrong_mapping_fails_the_stage_task_before_any_infer_task(airflow_db, tmp_path) -> None:
    write_transactions(tmp_path / "in", 4_000, files=1)
    dag = scoring_dag(
        "e2e_stage_checks",
        tmp_path,
        source=str(tmp_path / "in"),
        outputs={"probabilty": "risk_score"},
        table="never_written",
        infer_retries=2,
    )

    run = dag.test(logical_date=LOGICAL_DATE)

    states = task_states(run)
    assert run.state == "failed", states
    stage = _instances(run, "stage")[0]
    assert (stage.state, stage.try_number) == ("failed", 1)
    assert states["infer"] == ["upstream_failed"]
    assert states["persist"] == ["upstream_failed"]
    assert "success" in states["stop_server"] or states["start_server"] != ["success"], states
    assert processes_mentioning(tmp_path / "servers") == []


@pytest.fixture(scope="module")
def demo_dag(airflow_db):
    return load_dag("batch_inference_demo")


def _partitions(database, table: str) -> dict[str, int]:
    with duckdb.connect(str(database), read_only=True) as con:
        rows = con.execute(f'SELECT batch_partition, count(*) FROM "{table}" GROUP BY 1').fetchall()
    return dict(rows)


def test_limit_rows_scores_the_first_rows_into_a_scratch_partition(demo_dag, tmp_path) -> None:
    write_transactions(tmp_path / "in", 20_000, files=2, row_group_rows=1_500)
    database = tmp_path / "w.duckdb"
    conf = {
        "input_path": str(tmp_path / "in"),
        "table": "limited",
        "limit_rows": 4_000,
        "chunk_rows": 2_000,
        "sink_options": {"database": str(database)},
    }
    by_reference = demo_dag.test(logical_date=LOGICAL_DATE, run_conf=conf)
    assert by_reference.state == "success", task_states(by_reference)
    # By reference, whole row groups: the first three (4,500 rows) hold the first 4,000.
    assert _partitions(database, "limited") == {"2026-11-21__limit_4000": 4_500}

    by_copy = demo_dag.test(
        logical_date=LOGICAL_DATE, run_conf=conf | {"snapshot": "copy", "limit_rows": 3_333}
    )
    assert by_copy.state == "success", task_states(by_copy)
    assert _partitions(database, "limited") == {
        "2026-11-21__limit_4000": 4_500,
        "2026-11-21__limit_3333": 3_333,
    }
    with duckdb.connect(str(database), read_only=True) as con:
        ids = con.execute(
            "SELECT min(row_id), max(row_id) FROM limited WHERE batch_partition = '2026-11-21__limit_3333'"
        ).fetchone()
    assert ids == (0, 3_332)  # the first rows, in file order


def test_validate_only_checks_and_skips_the_rest(demo_dag, tmp_path) -> None:
    write_transactions(tmp_path / "in", 3_000, files=1)
    database = tmp_path / "w.duckdb"
    conf = {
        "input_path": str(tmp_path / "in"),
        "table": "validated",
        "validate_only": True,
        "sink_options": {"database": str(database)},
    }
    run = demo_dag.test(logical_date=LOGICAL_DATE, run_conf=conf)

    states = task_states(run)
    assert run.state == "success", states
    assert states["stage"] == ["skipped"]
    assert states["start_server"] == ["skipped"]
    assert states["infer"] == ["skipped"]
    assert states["persist"] == ["skipped"]
    assert states["stop_server"] == ["skipped"]
    assert not database.exists()
