"""The checks a run makes at its start (mapping against config.pbtxt, the sink's table) and which errors
fail a task without its retries."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import pyarrow as pa
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_batch_infer.client.tensors import ContractError
from airflow_batch_infer.contract_checks import check_mapping, outputs_schema, repository_contract
from airflow_batch_infer.errors import ModelLoadError, UnknownModelError, model_load_failure
from airflow_batch_infer.sinks import SchemaMismatchError
from airflow_batch_infer.sinks.table_checks import check_output_table
from tests.conftest import MODEL_REPOSITORY

FEATURES = [f"f{i:02d}" for i in range(16)]
SCHEMA = pa.schema(
    [("row_id", pa.int64()), ("transaction_id", pa.string())] + [(f, pa.float32()) for f in FEATURES]
)


def test_the_mapping_is_checked_against_config_pbtxt() -> None:
    metadata, config = repository_contract(MODEL_REPOSITORY, "risk_scorer")
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 16]}]
    bindings = check_mapping(metadata, config, SCHEMA, {"features": FEATURES}, {"probability": "risk_score"})
    assert [(b.tensor, b.column) for b in bindings] == [("probability", "risk_score")]
    with pytest.raises(
        ContractError, match=r"no output tensor 'probabilty'; its outputs are \['probability'\]"
    ):
        check_mapping(metadata, config, SCHEMA, {"features": FEATURES}, {"probabilty": "risk_score"})
    with pytest.raises(ContractError, match=r"takes 16 values a row .* but 15 column"):
        check_mapping(metadata, config, SCHEMA, {"features": FEATURES[:15]}, None)
    with pytest.raises(UnknownModelError, match=r"'fraud_v9' is not in the model repository .*'risk_scorer'"):
        repository_contract(MODEL_REPOSITORY, "fraud_v9")


def test_config_pbtxt_is_read_without_the_grpc_client(tmp_path) -> None:
    """The stage task's contract check and the local runtime's copy of the repository parse config.pbtxt
    without ``tritonclient.grpc``'s package import (grpc, numpy, ml_dtypes: 0.11 s before the server could
    start) or ``pyarrow.compute``; an infer task that imports the client later in the same process (``dags
    test``) gets the same ``ModelConfig`` message."""
    script = (
        "import sys\n"
        "from airflow_batch_infer.contract_checks import check_mapping, repository_contract\n"
        "from airflow_batch_infer.runtimes.local_repository import materialize_repository\n"
        "from tests.unit.test_early_checks import FEATURES, SCHEMA\n"
        f"metadata, config = repository_contract({str(MODEL_REPOSITORY)!r}, 'risk_scorer')\n"
        "check_mapping(metadata, config, SCHEMA, {'features': FEATURES}, {'probability': 'risk_score'})\n"
        f"print(materialize_repository({str(MODEL_REPOSITORY)!r}, ['risk_scorer'], "
        f"__import__('pathlib').Path({str(tmp_path / 'repo')!r})))\n"
        "print([m for m in ('grpc', 'tritonclient.grpc', 'pyarrow.compute') if m in sys.modules])\n"
        "import tritonclient.grpc\n"
        "from airflow_batch_infer.model_config import model_config_pb2\n"
        "print(tritonclient.grpc.model_config_pb2.ModelConfig is model_config_pb2().ModelConfig)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-3:] == ["['risk_scorer']", "[]", "True"]  # after the log line
    assert 'backend: "python"' in (tmp_path / "repo" / "risk_scorer" / "config.pbtxt").read_text()


def test_errors_a_retry_cannot_fix_fail_at_once() -> None:
    for error in (ContractError("x"), SchemaMismatchError("x"), UnknownModelError("x"), ModelLoadError("x")):
        assert isinstance(error, AirflowFailException)
    broken = (
        "Triton server abi-1 did not start: ... E1121 model_lifecycle.cc] failed to load 'broken' version 1"
    )
    assert isinstance(model_load_failure(broken), ModelLoadError)
    assert model_load_failure("it was not ready 600 s after the wait began (startup_timeout)") is None
    assert (
        model_load_failure("Triton server abi-2 did not become ready: the server is no longer running")
        is None
    )


def test_an_existing_duckdb_table_that_cannot_take_the_outputs_fails_at_the_start(tmp_path) -> None:
    database = tmp_path / "w.duckdb"
    with duckdb.connect(str(database)) as con:
        con.execute("CREATE TABLE scores (batch_partition VARCHAR, row_id BIGINT, risk_score VARCHAR)")
        con.execute("CREATE TABLE fitting (batch_partition VARCHAR, row_id BIGINT, risk_score FLOAT)")
    metadata, config = repository_contract(MODEL_REPOSITORY, "risk_scorer")
    bindings = check_mapping(metadata, config, SCHEMA, {"features": FEATURES}, {"probability": "risk_score"})
    parts = outputs_schema(SCHEMA, bindings, "row_id", [])
    options = {"database": str(database)}
    with pytest.raises(
        SchemaMismatchError,
        match=r"Column 'risk_score' of table scores is VARCHAR but the outputs hold FLOAT",
    ):
        check_output_table("duckdb", options, "scores", parts)
    assert check_output_table("duckdb", options, "fitting", parts) == f"DuckDB table fitting in {database}"
    assert check_output_table("duckdb", options, "not_yet", parts) is None
