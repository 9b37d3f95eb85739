"""What the end-to-end benchmark's parts share: its settings, its input, the check of each run's output."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench" / "e2e"
DAG_ID = "batch_inference_demo"
MODEL = "risk_scorer"
REQUEST_ROWS = 32_768  # the model's largest preferred batch size: what a Ray user would send
LOGICAL_DATE = "2026-11-21"
STEPS = ("stage", "start_server", "infer", "persist", "stop_server")
FILES = 8
WARMUP_ROWS = 100_000  # a first, unmeasured run of the scheduler's cluster

# What `make setup` builds, when the script runs without make (which exports it).
os.environ.setdefault("BATCH_INFER_TRITON_ENV", str(REPO / ".data" / "triton-server-env"))
sys.path.insert(0, str(REPO / "dags"))
sys.path.insert(0, str(REPO))

from bench_support import log, ratio  # noqa: E402,F401 (the e2e modules take them from here)


def ensure_input(rows: int) -> Path:
    """``rows`` demo transactions in 8 Parquet files, made once and kept under ``.bench/e2e``."""
    from transactions_data import write_transactions

    folder = BENCH / f"input-{rows}"
    marker = folder / "_READY"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        started = time.monotonic()
        write_transactions(folder, rows, files=FILES)
        marker.write_text(str(rows))
        log(f"wrote {rows:,} rows in {FILES} files in {time.monotonic() - started:.1f} s")
    return folder


def check_table(database: Path, table: str, partition: str, rows: int) -> dict[str, Any]:
    """Rows, distinct ids and a score sample of the run's partition, the sample checked against the model."""
    where = f'"{table}" WHERE batch_partition = $p'
    return _check_relation(database, where, {"p": partition}, rows)


def check_output(home: Path, conf: dict[str, Any], rows: int) -> dict[str, Any]:
    """:func:`check_table` wherever the run's sink committed the partition: the DuckDB warehouse under the
    run's ``home``, or the files that an ``s3_parquet`` dataset's pointer names."""
    if conf.get("sink", "duckdb") == "duckdb":
        return check_table(home / "warehouse.duckdb", conf["table"], conf["partition"], rows)
    from airflow_batch_infer.sinks.s3_versions import committed_files

    files = committed_files(conf["sink_options"]["path"], conf["table"], conf["partition"])
    return _check_relation(None, "read_parquet($files)", {"files": files}, rows)


def with_sink_home(conf: dict[str, Any], home: Path) -> dict[str, Any]:
    """``conf`` with an ``s3_parquet`` sink's dataset under the run's ``home`` (a fresh one each run)."""
    if conf.get("sink", "duckdb") == "duckdb":
        return conf
    return conf | {"sink_options": {"path": str(home / "lake")}}


def _check_relation(
    database: Path | None, relation: str, params: dict[str, Any], rows: int
) -> dict[str, Any]:
    import duckdb

    with duckdb.connect(str(database) if database else ":memory:", read_only=bool(database)) as con:
        count, distinct = con.execute(
            f"SELECT count(*), count(DISTINCT transaction_id) FROM {relation}", params
        ).fetchone()
        sample = con.execute(
            f"SELECT transaction_id, risk_score FROM {relation} ORDER BY transaction_id LIMIT 5", params
        ).fetchall()
    return {"rows": count, "distinct_ids": distinct, "sample": sample, "complete": count == distinct == rows}


def expected_scores(source: Path, ids: list[int]) -> dict[int, float]:
    """The model's scores for ``ids``, run directly with onnxruntime (the server's own kernels)."""
    import numpy as np
    import onnxruntime as ort
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    from transactions_data import FEATURES

    table = ds.dataset(source).to_table(filter=pc.field("transaction_id").isin(ids))
    features = np.column_stack([table.column(f).to_numpy() for f in FEATURES]).astype(np.float32)
    session = ort.InferenceSession(str(REPO / "triton_models" / MODEL / "1" / "model.onnx"))
    scores = session.run(["probability"], {"features": features})[0][:, 0]
    return dict(zip(table.column("transaction_id").to_pylist(), scores.tolist(), strict=True))


def sample_ok(source: Path, sample: list[tuple[int, float]]) -> bool:
    expected = expected_scores(source, [int(i) for i, _ in sample])
    return bool(sample) and all(abs(expected[int(i)] - float(s)) < 1e-5 for i, s in sample)
