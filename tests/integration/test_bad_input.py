"""Bad input through the operators, against a real server: each fails with a message that names the
problem, or sets rows aside with a reason; nothing is silently dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transactions_data import FEATURES, write_transactions

from airflow_batch_infer.errors import StagingError
from airflow_batch_infer.operators.infer import TritonInferenceOperator
from airflow_batch_infer.operators.persist import IncompleteRunError, PersistOutputsOperator
from airflow_batch_infer.staging import stage_parquet

pytestmark = pytest.mark.integration

CONTEXT = {"partition_key": "2026-11-21", "run_id": "manual__bad_input"}


def infer(triton_server, chunk: dict) -> dict:
    operator = TritonInferenceOperator(
        task_id="infer",
        chunk=chunk,
        server=triton_server.to_dict(),
        model_name="risk_scorer",
        inputs={"features": FEATURES},
    )
    return operator.execute(CONTEXT)


def test_too_many_rows_set_aside_fail_the_run_and_write_nothing(triton_server, tmp_path: Path) -> None:
    write_transactions(tmp_path / "in", 4_000, files=1)
    table = pq.read_table(tmp_path / "in")
    f01 = table.column("f01").to_numpy().copy()
    f01[::10] = np.nan  # 10 % of the rows cannot be scored
    table = table.set_column(table.schema.get_field_index("f01"), "f01", pa.array(f01))
    (tmp_path / "nan").mkdir()
    pq.write_table(table, tmp_path / "nan" / "part.parquet")
    manifest = stage_parquet(tmp_path / "nan", tmp_path / "run", chunk_rows=2_000)
    chunks = [c.to_dict() for c in manifest.chunks]
    results = [infer(triton_server, chunk) for chunk in chunks]
    assert sum(r["rows_rejected"] for r in results) == 400
    database = tmp_path / "w.duckdb"

    strict = PersistOutputsOperator(
        task_id="persist",
        chunks=chunks,
        table="scores",
        sink_options={"database": str(database)},
        max_rejected_fraction=0.05,
    )
    with pytest.raises(
        IncompleteRunError, match=r"400 of 4,000 rows \(10\.00%\) were set aside.*nothing written"
    ):
        strict.execute(CONTEXT)
    assert not database.exists()

    lenient = PersistOutputsOperator(
        task_id="persist",
        chunks=chunks,
        table="scores",
        sink_options={"database": str(database)},
        max_rejected_fraction=0.2,
    )
    summary = lenient.execute(CONTEXT)
    assert (summary["rows"], summary["rejected"]) == (3_600, 400)


def test_a_chunk_outside_its_run_folder_is_refused(triton_server, tmp_path: Path) -> None:
    write_transactions(tmp_path / "in", 100, files=1)
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", snapshot="copy")
    forged = manifest.chunks[0].to_dict() | {"path": str(tmp_path / "in" / "part-000.parquet")}
    with pytest.raises(StagingError, match="is outside the staging folder"):
        infer(triton_server, forged)
    # By reference, a descriptor names files by their index in the run's manifest, never by path.
    pinned = stage_parquet(tmp_path / "in", tmp_path / "pinned").chunks[0].to_dict()
    forged = pinned | {"slices": [{"file": 7, "row_groups": [0, 1], "first_row": 0}]}
    with pytest.raises(StagingError, match="names file 7, not in the manifest"):
        infer(triton_server, forged)


def test_a_chunk_that_is_not_complete_is_not_persisted(triton_server, tmp_path: Path) -> None:
    write_transactions(tmp_path / "in", 3_000, files=1, row_group_rows=1_000)
    manifest = stage_parquet(tmp_path / "in", tmp_path / "run", chunk_rows=1_000)
    chunks = [c.to_dict() for c in manifest.chunks]
    infer(triton_server, chunks[0])
    infer(triton_server, chunks[2])  # chunk 1's task never ran
    operator = PersistOutputsOperator(
        task_id="persist",
        chunks=chunks,
        table="scores",
        sink_options={"database": str(tmp_path / "w.duckdb")},
    )
    with pytest.raises(IncompleteRunError, match="chunk 1 has no output part"):
        operator.execute(CONTEXT)
    assert not (tmp_path / "w.duckdb").exists()
