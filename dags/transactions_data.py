"""Demo data: card transactions with 16 numeric features, generated from a fixed seed, and their Asset;
how the demo DAGs score them, and the Params they share."""

from __future__ import annotations

import itertools
from pathlib import Path

from airflow.sdk import Asset, Param

from airflow_batch_infer.paths import batch_infer_home

FEATURES = [f"f{i:02d}" for i in range(16)]
TRANSACTIONS_PATH = batch_infer_home() / "etl" / "transactions"
# Produced by the etl_transactions DAG; batch_inference_demo is scheduled on it. The URI names the data
# set, not the folder, so that moving $BATCH_INFER_HOME does not make a new asset. Its scheme is a custom
# one ("x-..."): Airflow looks up no provider's URI normalizer for it, where "demo://" made every parse of
# the DAG file (each task process parses it) import every provider's asset handlers, the amazon
# provider's S3 hook among them: 0.43 s of CPU.
TRANSACTIONS = Asset(name="transactions_features", uri="x-batch-infer://etl/transactions")

#: How the demo DAGs score the transactions: the model repository and the column ↔ tensor mapping.
RISK_SCORING = {
    "model_repository": Path(__file__).resolve().parent.parent / "triton_models",
    "inputs": {"features": FEATURES},
    "outputs": {"probability": "risk_score"},
    "passthrough_columns": ["transaction_id"],
}


def model_params() -> dict[str, Param]:
    """The Params of the model and the input, the same in both demo DAGs (new objects for each DAG)."""
    return {
        "model_name": Param("risk_scorer", type="string", description="Triton model to call."),
        "model_version": Param(
            "", type="string", description="Model version to call; empty: the server's choice."
        ),
        "input_path": Param(str(TRANSACTIONS_PATH), type="string", description="Parquet file or folder."),
    }


def table_param(default: str) -> Param:
    """The output table's Param: a table or schema.table name, ``default`` unless the trigger says."""
    return Param(
        default,
        type="string",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$",
        description="Output table, or schema.table.",
    )


def write_transactions(
    target: str | Path, rows: int, files: int = 4, seed: int = 7, row_group_rows: int = 131_072
) -> int:
    """Write ``rows`` transactions as ``files`` Parquet files in ``target`` (replacing earlier ones).

    :param target: output folder.
    :param rows: rows in all.
    :param files: number of files.
    :param seed: random seed; the same seed gives the same rows.
    :param row_group_rows: rows per Parquet row group (chunks by reference end at row-group boundaries).
    """
    import numpy as np  # here, not at the top: every task process parses the DAG files that import this
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.parquet"):
        old.unlink()
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, rows, files + 1, dtype=np.int64)
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        n = int(hi - lo)
        columns = {
            "transaction_id": pa.array(np.arange(lo, hi, dtype=np.int64) + 10_000_000),
            "customer_id": pa.array(rng.integers(1, 200_000, n, dtype=np.int64)),
            "amount": pa.array(np.round(rng.lognormal(3.5, 1.1, n), 2)),
        }
        features = rng.standard_normal((n, len(FEATURES)), dtype=np.float32)
        columns.update({name: pa.array(features[:, j]) for j, name in enumerate(FEATURES)})
        pq.write_table(pa.table(columns), target / f"part-{i:03d}.parquet", row_group_size=row_group_rows)
    return rows
