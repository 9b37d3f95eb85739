"""Lineage, the output Asset and the extra links of a real run (``dag.test()``, real tritonserver, DuckDB).

The OpenLineage provider's own listener emits the events, through its file transport (set below, before
any task runs in this session), in a thread rather than a fork.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from transactions_data import write_transactions

from tests.conftest import MODEL_REPOSITORY, task_states
from tests.dag_registry import register_dag
from tests.e2e.scoring_dag import LOGICAL_DATE, scoring_dag

pytestmark = pytest.mark.e2e
pytest.importorskip(
    "airflow.providers.openlineage", reason="the lineage tests need the openlineage extra (in dev)"
)

EVENTS = Path(tempfile.mkdtemp(prefix="abi-lineage-")) / "events.jsonl"
os.environ["AIRFLOW__OPENLINEAGE__TRANSPORT"] = json.dumps(
    {"type": "file", "log_file_path": str(EVENTS), "append": True}
)
os.environ["AIRFLOW__OPENLINEAGE__EXECUTE_IN_THREAD"] = "True"
os.environ["AIRFLOW__OPENLINEAGE__NAMESPACE"] = "batch-infer-tests"


def complete_events(dag_id: str) -> dict[str, dict]:
    """Task id (without its group; mapped tasks keep their last) → its COMPLETE event."""
    events = {}
    for line in EVENTS.read_text().splitlines():
        event = json.loads(line)
        name = event["job"]["name"]
        if event["eventType"] == "COMPLETE" and name.startswith(dag_id + "."):
            events[name.rsplit(".", 1)[-1]] = event
    return events


def test_a_run_reports_lineage_emits_its_table_asset_and_links_its_outputs(airflow_db, tmp_path) -> None:
    from airflow.models.asset import AssetDagRunQueue, AssetEvent, AssetModel
    from airflow.models.dag import DagModel
    from airflow.models.xcom import XComModel
    from airflow.sdk import DAG
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from airflow_batch_infer.assets import output_asset

    rows = 6_000
    write_transactions(tmp_path / "in", rows, files=1, row_group_rows=1_500)
    sink_options = {"database": str(tmp_path / "w.duckdb")}
    dag = scoring_dag(
        "e2e_lineage",
        tmp_path,
        source=str(tmp_path / "in"),
        outputs={"probability": "risk_score"},
        table="lineage_scores",
        chunk_rows=3_000,
        sink_options=sink_options,
    )
    table_asset = output_asset("duckdb", "lineage_scores", sink_options)
    with DAG(dag_id="e2e_lineage_downstream", schedule=[table_asset], start_date=LOGICAL_DATE) as downstream:
        pass
    register_dag(downstream)
    with create_session() as session:  # new DAGs start paused; a paused DAG is not queued
        session.get(DagModel, "e2e_lineage_downstream").is_paused = False

    run = dag.test(logical_date=LOGICAL_DATE)
    assert run.state == "success", task_states(run)

    events = complete_events("e2e_lineage")
    stage, infer, persist = events["stage"], events["infer"], events["persist"]
    assert [(d["namespace"], d["name"]) for d in stage["inputs"]] == [("file", str(tmp_path / "in"))]
    assert {f["name"] for f in stage["inputs"][0]["facets"]["schema"]["fields"]} >= {"transaction_id", "f00"}
    (snapshot,) = stage["outputs"]
    assert snapshot["name"].endswith("/manifest.json")
    assert snapshot["outputFacets"]["outputStatistics"]["rowCount"] == rows

    model = next(d for d in infer["inputs"] if d["namespace"].startswith("triton://"))
    assert model["name"] == "risk_scorer"
    assert model["facets"]["version"]["datasetVersion"] == "1"
    assert {f["name"] for f in model["facets"]["schema"]["fields"]} == {"features", "probability"}
    assert [o["outputFacets"]["outputStatistics"]["rowCount"] for o in infer["outputs"]] == [3_000, 0]
    assert {d["name"] for d in events["start_server"]["inputs"]} == {str(MODEL_REPOSITORY / "risk_scorer")}

    outputs = {d["name"]: d for d in persist["outputs"]}
    assert set(outputs) == {"main.lineage_scores", "main.lineage_scores_rejects"}
    assert {d["namespace"] for d in outputs.values()} == {f"duckdb://{tmp_path / 'w.duckdb'}"}
    assert outputs["main.lineage_scores"]["outputFacets"]["outputStatistics"]["rowCount"] == rows
    assert outputs["main.lineage_scores_rejects"]["outputFacets"]["outputStatistics"]["rowCount"] == 0
    columns = {f["name"] for f in outputs["main.lineage_scores"]["facets"]["schema"]["fields"]}
    assert {"row_id", "risk_score"} <= columns
    EVENTS.with_name("persist_event.json").write_text(json.dumps(persist, indent=1))  # the docs' excerpt

    with create_session() as session:
        asset = session.scalar(select(AssetModel).where(AssetModel.uri == table_asset.uri))
        assert asset is not None, f"no Asset {table_asset.uri}"
        (event,) = session.scalars(select(AssetEvent).where(AssetEvent.asset_id == asset.id)).all()
        assert event.extra["rows"] == rows
        assert event.extra["rejected"] == 0
        # The persist step's own rate, as its summary has it (not the infer tasks' summed seconds).
        summary = json.loads(Path(snapshot["name"]).with_name("summary.json").read_text())
        assert event.extra["rows_per_second"] == summary["persist_rows_per_second"] > 0
        queued = session.scalars(select(AssetDagRunQueue.target_dag_id)).all()
        assert "e2e_lineage_downstream" in queued
        links = dict(
            session.execute(
                select(XComModel.key, XComModel.value).where(
                    XComModel.dag_id == "e2e_lineage", XComModel.key.like("_link_%")
                )
            ).all()
        )

    def link(name: str) -> str:
        value = links[f"_link_{name}"]  # JSON text, or already decoded, by the metadata database's dialect
        return json.loads(value) if isinstance(value, str) and value.startswith('"') else value

    assert link("OutputTableLink") == table_asset.uri
    run_dir = json.loads(Path(snapshot["name"]).read_text())["run_dir"]
    assert link("RunReportLink") == f"file://{run_dir}/report.html"
    assert link("TritonMetricsLink").startswith("http://127.0.0.1:")
    assert link("TritonMetricsLink").endswith("/metrics")
    assert link("TritonServerLogLink").startswith(f"file://{tmp_path / 'servers'}")
    assert link("KubernetesPodLink") == ""
    assert link("EcsTaskLink") == ""
