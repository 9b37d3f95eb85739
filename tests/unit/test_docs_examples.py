"""The code the docs show is code that runs: docs/examples/*.py parse as Airflow parses DAGs, with the tasks
the pages describe; README.md's DAG is docs/examples/quickstart.py, byte for byte; every file the pages
include exists, with the sections they name (``mkdocs build --strict``, ``make docs``, checks that too)."""

from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from airflow_batch_infer.runtimes import get_runtime
from airflow_batch_infer.runtimes.containers import TRITON_IMAGE, TRITON_TRTLLM_IMAGE
from airflow_batch_infer.sinks import get_sink
from tests.conftest import REPO

EXAMPLES = REPO / "docs" / "examples"
PIPELINE = {"stage", "start_server", "infer", "persist", "report", "stop_server"}
GROUP_TASKS = {f"batch_inference.{task}" for task in PIPELINE}
#: The example DAGs built with batch_inference(...), and those composed otherwise.
TASK_GROUP_DAGS = [
    "nightly_scoring",
    "scoring_on_docker",
    "scoring_on_kubernetes",
    "scoring_on_ecs",
    "scoring_on_kubernetes_fleet",
    "document_summaries",
    "case_scoring",
]
OTHER_DAGS = ["scoring_operators", "report_on_scores"]


@pytest.fixture(scope="module")
def dags() -> dict:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(EXAMPLES))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


def test_every_example_dag_is_there(dags: dict) -> None:
    assert set(dags) == {*TASK_GROUP_DAGS, *OTHER_DAGS}


@pytest.mark.parametrize("dag_id", TASK_GROUP_DAGS)
def test_task_group_examples_build_the_pipeline(dags: dict, dag_id: str) -> None:
    dag = dags[dag_id]
    assert set(dag.task_dict) == GROUP_TASKS
    stop = dag.task_dict["batch_inference.stop_server"]
    assert stop.is_teardown
    assert dag.task_dict["batch_inference.start_server"].is_setup


def test_the_operators_example_wires_them_as_the_task_group_does(dags: dict) -> None:
    dag = dags["scoring_operators"]
    assert set(dag.task_dict) == PIPELINE
    tasks = dag.task_dict
    assert tasks["stop_server"].is_teardown
    assert tasks["start_server"].is_setup
    assert tasks["infer"].upstream_task_ids == {"stage", "start_server"}
    assert tasks["persist"].upstream_task_ids == {"infer", "stage"}
    assert tasks["report"].upstream_task_ids == {"infer", "persist", "stage"}
    group = dags["nightly_scoring"].task_dict
    for task in PIPELINE:
        upstream = group[f"batch_inference.{task}"].upstream_task_ids
        assert tasks[task].upstream_task_ids == {t.removeprefix("batch_inference.") for t in upstream}, task


@pytest.mark.parametrize(
    "dag_id", ["scoring_on_docker", "scoring_on_kubernetes", "scoring_on_ecs", "scoring_on_kubernetes_fleet"]
)
def test_documented_runtime_options_are_the_runtimes_keywords(dags: dict, dag_id: str) -> None:
    start = dags[dag_id].task_dict["batch_inference.start_server"]
    runtime = get_runtime(start.runtime, **start.runtime_options)  # a wrong keyword raises TypeError
    assert runtime.name == start.runtime


def test_the_llm_example_maps_the_generate_operator(dags: dict) -> None:
    infer = dags["document_summaries"].task_dict["batch_inference.infer"]
    assert infer.operator_name == "TritonGenerateOperator"
    assert infer.partial_kwargs["parameter_columns"] == {"max_tokens": "summary_len"}


def test_the_outputs_example_postprocess_keeps_every_row() -> None:
    from docs.examples.outputs import refer_or_clear

    frame = pd.DataFrame({"row_id": [1, 2], "p_benign": [0.9, 0.2], "p_malignant": [0.1, 0.8]})
    assert refer_or_clear(frame)["decision"].tolist() == ["clear", "refer"]


def test_the_downstream_example_reads_what_persist_emits(dags: dict, capsys: pytest.CaptureFixture) -> None:
    from docs.examples.downstream import scores, summarise

    extra = {"partition": "2026-11-21", "rows": 20000, "rows_per_second": 1.5e6}
    summarise.function(triggering_asset_events={scores: [SimpleNamespace(extra=extra)]})
    assert capsys.readouterr().out.split() == ["2026-11-21", "20000", "1500000.0"]
    assert [a.uri for a in dags["report_on_scores"].timetable.asset_condition.objects] == [scores.uri]


def test_the_iceberg_example_reads_a_partition_the_sink_wrote(tmp_path) -> None:
    from docs.examples.read_iceberg import read_day

    part, rejects = tmp_path / "part-00000.parquet", tmp_path / "rejects-00000.parquet"
    pq.write_table(pa.table({"row_id": pa.array([1, 2], pa.int64()), "score": [0.25, 0.75]}), part)
    pq.write_table(pa.table({"row_id": pa.array([3], pa.int64()), "reject_reason": ["null input"]}), rejects)
    lake = tmp_path / "lake"
    sink = get_sink("iceberg", table="transaction_scores", warehouse=str(lake))
    sink.replace_partition("2026-11-21", [part], [rejects])

    day = read_day(str(lake), "2026-11-21")
    assert sorted(day.column("row_id").to_pylist()) == [1, 2]


def test_readme_dag_is_the_quickstart_example() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert (EXAMPLES / "quickstart.py").read_text() in blocks


def test_every_included_file_and_section_exists() -> None:
    """What ``--8<--`` includes: a missing one fails the docs build; this says which, without building."""
    for page in (REPO / "docs").rglob("*.md"):
        for target in re.findall(r'--8<-- "([^"]+)"', page.read_text()):
            path, _, section = target.partition(":")
            assert (REPO / path).is_file(), (page.name, path)
            if section:
                text = (REPO / path).read_text()
                assert f"[start:{section}]" in text, (page.name, target)
                assert f"[end:{section}]" in text, (page.name, target)


def _declared() -> dict[str, set[str]]:
    """Package → the version specifiers pyproject.toml gives it (core and extras)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found: dict[str, set[str]] = {}
    for line in [*project["dependencies"], *itertools.chain(*project["optional-dependencies"].values())]:
        requirement = Requirement(line)
        found.setdefault(requirement.name.lower(), set()).add(str(requirement.specifier))
    return found


def _locked() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (REPO / "requirements" / "lock.txt").read_text(), re.M)
    return {name.lower(): version for name, version in pins}


def test_the_compatibility_page_matches_pyproject_and_the_lock() -> None:
    page = (REPO / "docs" / "compatibility.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9\-]+)` \| `([^`]+)` \| `([^`]+)` \|$", page, re.M)
    assert len(rows) >= 10
    declared, locked = _declared(), _locked()
    for name, spec, version in rows:
        assert str(SpecifierSet(spec)) in declared[name], (name, spec, declared[name])
        assert locked[name] == version, (name, version, locked[name])
    assert f"| {locked['apache-airflow']} | {locked['tritonclient']} |" in page
    assert f"`{TRITON_IMAGE}`" in page
    assert f"`{TRITON_TRTLLM_IMAGE}`" in page
    server = (REPO / "airflow_batch_infer" / "runtimes" / "server-requirements.txt").read_text()
    pytriton = re.search(r"^nvidia-pytriton==(\S+)", server, re.M).group(1)
    assert f"`nvidia-pytriton` {pytriton}" in page
