"""Test environment: a private AIRFLOW_HOME and BATCH_INFER_HOME, a real tritonserver, real Airflow.

The environment is set before Airflow is first imported, so every test (and every subprocess) uses
the temporary folders, never the user's. The local Triton runtime's server environment is shared with
`make setup` (``$BATCH_INFER_TRITON_ENV``), so it is built once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO / "triton_models"
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="abi-tests-"))

os.environ.setdefault("BATCH_INFER_TRITON_ENV", str(REPO / ".data" / "triton-server-env"))
os.environ["BATCH_INFER_HOME"] = str(_SESSION_DIR / "home")
os.environ["AIRFLOW_HOME"] = str(_SESSION_DIR / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
sys.path.insert(0, str(REPO / "dags"))


def processes_mentioning(path: str | Path) -> list[int]:
    """Pids of live processes whose command line mentions ``path`` (servers started under it, their stubs).

    Tests look for their own servers this way, not for every tritonserver: other servers may be running.
    """
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if str(path) in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def column_layouts(source: str | Path | pa.NativeFile) -> dict[str, tuple[str, set[str]]]:
    """Each column's codec and encodings in a Parquet file's first row group, as a reader sees them."""
    group = pq.ParquetFile(source).metadata.row_group(0)
    return {
        group.column(i).path_in_schema: (group.column(i).compression, set(group.column(i).encodings))
        for i in range(group.num_columns)
    }


def definition_levels(source: str | Path | pa.NativeFile) -> dict[str, int]:
    """Each Parquet column's maximum definition level: 0 for a REQUIRED column, 1 for an optional one."""
    schema = pq.ParquetFile(source).schema
    return {schema.column(i).path: schema.column(i).max_definition_level for i in range(len(schema))}


def chunk_threads() -> list[str]:
    """Names of the chunk streamer's reader and writer threads still alive in this process."""
    return [t.name for t in threading.enumerate() if t.name.startswith(("chunk-read", "chunk-write"))]


@pytest.fixture(scope="session")
def model_repository() -> Path:
    return MODEL_REPOSITORY


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One real local tritonserver serving ``risk_scorer`` for the whole session."""
    from airflow_batch_infer.runtimes import get_runtime

    runtime = get_runtime("local", work_root=str(tmp_path_factory.mktemp("servers")))
    info = runtime.start(str(MODEL_REPOSITORY), ["risk_scorer"])
    try:
        yield info
    finally:
        runtime.stop(info)
    assert not runtime.is_running(info)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata database in the session's AIRFLOW_HOME."""
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    airflow = shutil.which("airflow", path=str(Path(sys.executable).parent)) or "airflow"
    done = subprocess.run([airflow, "db", "migrate"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return home


def load_dag(dag_id: str):
    """A DAG of the repository's DAGs folder, parsed as Airflow parses it."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]


def task_states(dag_run) -> dict[str, list[str]]:
    """Task id (without its group) → the states of its task instances, for assertion messages."""
    states: dict[str, list[str]] = {}
    for ti in dag_run.get_task_instances():
        states.setdefault(ti.task_id.split(".")[-1], []).append(str(ti.state))
    return states


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
