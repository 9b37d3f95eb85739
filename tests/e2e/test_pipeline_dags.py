"""The pipeline run by Airflow itself (``dag.test()``): real tasks, real tritonserver, real DuckDB."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from transactions_data import FEATURES, write_transactions

from tests.conftest import MODEL_REPOSITORY, load_dag, processes_mentioning, task_states
from tests.dag_registry import register_dag
from tests.e2e.scoring_dag import LOGICAL_DATE, scoring_dag

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo_dag(airflow_db):
    return load_dag("batch_inference_demo")


def warehouse() -> Path:
    from airflow_batch_infer.paths import batch_infer_home

    return batch_infer_home() / "warehouse.duckdb"


def partition_counts(table: str) -> dict[str, tuple[int, int]]:
    """Partition → (rows, distinct row ids) of a warehouse table; empty when there is no such table."""
    if not warehouse().exists():
        return {}
    with duckdb.connect(str(warehouse()), read_only=True) as con:
        if not con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = $t", {"t": table}
        ).fetchone()[0]:
            return {}
        rows = con.execute(
            f'SELECT batch_partition, count(*), count(DISTINCT row_id) FROM "{table}" GROUP BY 1 ORDER BY 1'
        ).fetchall()
    return {p: (n, distinct) for p, n, distinct in rows}


def test_every_row_lands_once_and_a_rerun_replaces_its_partition(demo_dag, tmp_path) -> None:
    rows = 30_000
    write_transactions(tmp_path / "in", rows, files=3, row_group_rows=2_000)
    conf = {"input_path": str(tmp_path / "in"), "chunk_rows": 8_000, "table": "scores_e2e"}
    first = demo_dag.test(logical_date=LOGICAL_DATE, run_conf=conf)
    assert first.state == "success", task_states(first)
    assert task_states(first)["infer"] == ["success"] * 4
    assert partition_counts("scores_e2e") == {"2026-11-21": (rows, rows)}
    with duckdb.connect(str(warehouse()), read_only=True) as con:
        scored = con.sql(
            "SELECT transaction_id, risk_score FROM scores_e2e ORDER BY transaction_id"
        ).to_arrow_table()
        assert con.execute("SELECT count(*) FROM scores_e2e_rejects").fetchone() == (0,)
    source = pq.read_table(tmp_path / "in").sort_by("transaction_id")
    assert scored.column("transaction_id").to_pylist() == source.column("transaction_id").to_pylist()
    assert pc.all(
        pc.and_(pc.greater(scored.column("risk_score"), 0), pc.less(scored.column("risk_score"), 1))
    ).as_py()

    again = demo_dag.test(logical_date=LOGICAL_DATE, run_conf=conf)
    assert again.state == "success", task_states(again)
    assert partition_counts("scores_e2e") == {"2026-11-21": (rows, rows)}

    other_day = demo_dag.test(logical_date=LOGICAL_DATE, run_conf=conf | {"partition": "2026-11-22"})
    assert other_day.state == "success", task_states(other_day)
    assert partition_counts("scores_e2e") == {"2026-11-21": (rows, rows), "2026-11-22": (rows, rows)}
    assert processes_mentioning(warehouse().parent / "servers") == []


def test_a_failing_infer_task_still_stops_the_server(airflow_db, tmp_path) -> None:

    write_transactions(tmp_path / "in", 9_000, files=1)
    table = pq.read_table(tmp_path / "in")
    index = table.schema.get_field_index("f05")
    broken = table.set_column(index, "f05", pc.cast(table.column("f05"), pa.string()))
    (tmp_path / "broken").mkdir()
    pq.write_table(broken, tmp_path / "broken" / "part.parquet", row_group_size=3_000)

    dag = scoring_dag(
        "e2e_failing_infer",
        tmp_path,
        source=str(tmp_path / "broken"),
        table="never_written",
        chunk_rows=3_000,
        infer_retries=0,
    )

    run = dag.test(logical_date=LOGICAL_DATE)

    states = task_states(run)
    assert run.state == "failed"
    # The string column is refused by the stage task's check against config.pbtxt, before any infer task;
    # a server started beside it is stopped by the teardown all the same.
    assert states["stage"] == ["failed"]
    assert states["infer"] == ["upstream_failed"]
    assert states["persist"] == ["upstream_failed"]
    assert processes_mentioning(tmp_path / "servers") == []
    assert not (tmp_path / "w.duckdb").exists()


def test_a_server_that_runs_anyway_is_reached_through_the_connection(
    airflow_db, triton_server, tmp_path, monkeypatch
) -> None:
    import json

    from airflow.sdk import DAG

    from airflow_batch_infer.task_group import batch_inference

    host, port = triton_server.grpc_url.rsplit(":", 1)
    monkeypatch.setenv(
        "AIRFLOW_CONN_TRITON_SHARED", json.dumps({"conn_type": "triton", "host": host, "port": int(port)})
    )
    write_transactions(tmp_path / "in", 5_000, files=1)
    with DAG(dag_id="e2e_shared_server", schedule=None, start_date=LOGICAL_DATE) as dag:
        batch_inference(
            source=str(tmp_path / "in"),
            model_name="risk_scorer",
            inputs={"features": FEATURES},
            table="shared_scores",
            runtime=None,
            triton_conn_id="triton_shared",
            chunk_rows=2_500,
            staging_root=str(tmp_path / "staging"),
            sink_options={"database": str(tmp_path / "w.duckdb")},
        )
    register_dag(dag)
    assert {t.task_id.split(".")[-1] for t in dag.tasks} == {"stage", "infer", "persist", "report"}

    run = dag.test(logical_date=LOGICAL_DATE)

    assert run.state == "success", task_states(run)
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT row_id) FROM shared_scores").fetchone() == (
            5_000,
            5_000,
        )
    assert processes_mentioning(triton_server.handle["workdir"]), "the shared server must still be running"


def test_a_model_that_will_not_load_fails_the_start_task_and_leaves_nothing_running(
    airflow_db, tmp_path
) -> None:
    import shutil

    repository = tmp_path / "models"
    shutil.copytree(MODEL_REPOSITORY / "risk_scorer", repository / "risk_scorer")
    (repository / "risk_scorer" / "1" / "model.onnx").write_bytes(b"this is not an ONNX graph")
    write_transactions(tmp_path / "in", 1_000, files=1)
    dag = scoring_dag(
        "e2e_model_will_not_load",
        tmp_path,
        source=str(tmp_path / "in"),
        model_repository=repository,
        table="never_written",
        runtime_options={"work_root": str(tmp_path / "servers"), "startup_timeout": 60},
    )

    run = dag.test(logical_date=LOGICAL_DATE)

    states = task_states(run)
    assert run.state == "failed"
    assert states["start_server"] == ["failed"]
    assert states["infer"] == ["upstream_failed"]
    assert processes_mentioning(tmp_path / "servers") == []
    logs = list((tmp_path / "servers").glob("*/server.log"))
    assert logs, "the server's own log is kept for the person who reads the failure"
    assert "failed to load 'risk_scorer'" in logs[0].read_text()
    assert "INVALID_PROTOBUF" in logs[0].read_text()
    assert not (tmp_path / "w.duckdb").exists()


@pytest.mark.parametrize(
    ("sink", "infer_options", "compressed"),
    [
        ("duckdb", None, None),  # by where the parts go: uncompressed on local disk
        ("postgres", None, None),
        ("s3_parquet", None, True),  # the dataset is made of the parts themselves
        ("athena", None, True),
        ("athena", {"compress_parts": False}, False),  # the user's word wins
        ("{{ params.sink }}", None, True),  # a templated sink, rendered per run (here: athena)
    ],
)
def test_parts_are_compressed_for_sinks_whose_table_is_the_parts(
    sink: str, infer_options: dict | None, compressed: bool | None
) -> None:
    from airflow.sdk import DAG

    from airflow_batch_infer.task_group import batch_inference

    with DAG(dag_id="parts_compression", schedule=None, start_date=LOGICAL_DATE) as dag:
        batch_inference(
            source="/data/in",
            model_name="risk_scorer",
            model_repository=MODEL_REPOSITORY,
            inputs={"features": FEATURES},
            table="scores",
            sink=sink,
            infer_options=infer_options,
        )

    mapped = dag.get_task("batch_inference.infer")
    # The task as a run unmaps it (the server's address left out: an XCom of the start task).
    kwargs = {k: v for k, v in mapped.partial_kwargs.items() if k not in ("task_id", "server")}
    operator = mapped.operator_class(task_id="infer", chunk={}, **kwargs)
    operator.render_template_fields({"params": {"sink": "athena"}})  # as a run's Params would
    assert operator.parts_compressed() == compressed


def test_params_cannot_point_the_demo_outside_its_allowlists(airflow_db, tmp_path, monkeypatch) -> None:
    from airflow_batch_infer.paths import batch_infer_home

    write_transactions(tmp_path / "allowed", 2_000, files=1)
    write_transactions(tmp_path / "elsewhere", 2_000, files=1)
    monkeypatch.setenv("BATCH_INFER_ALLOWED_ROOTS", f'["{tmp_path / "allowed"}", "{batch_infer_home()}"]')
    monkeypatch.setenv("BATCH_INFER_ALLOWED_CONN_IDS", '["warehouse"]')
    dag = load_dag("batch_inference_demo")  # parsed with the allowlists in its environment

    refused = dag.test(
        logical_date=LOGICAL_DATE,
        run_conf={
            "input_path": str(tmp_path / "elsewhere"),
            "table": "scores_allowlist",
            "partition": "2026-12-01",
        },
    )

    states = task_states(refused)
    assert refused.state == "failed"
    assert states["stage"] == ["failed"]
    assert states["infer"] == ["upstream_failed"]
    assert states["stop_server"] == ["success"]
    assert "2026-12-01" not in partition_counts("scores_allowlist")
    assert processes_mentioning(batch_infer_home() / "servers") == []

    allowed = dag.test(
        logical_date=LOGICAL_DATE,
        run_conf={
            "input_path": str(tmp_path / "allowed"),
            "table": "scores_allowlist",
            "partition": "2026-12-01",
        },
    )
    assert allowed.state == "success", task_states(allowed)
    assert partition_counts("scores_allowlist")["2026-12-01"] == (2_000, 2_000)
