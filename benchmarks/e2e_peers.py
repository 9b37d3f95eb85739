"""The peers on the same files and the same local Triton server: Ray Data, and the naive loop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from e2e_common import BENCH, MODEL, REPO, REQUEST_ROWS, sample_ok


def start_server() -> tuple[Any, Any, float]:
    from airflow_batch_infer.runtimes import get_runtime

    runtime = get_runtime("local", work_root=str(BENCH / "peer-servers"))
    started = time.monotonic()
    info = runtime.start(str(REPO / "triton_models"), [MODEL])
    return runtime, info, time.monotonic() - started


def stop_server(runtime: Any, info: Any) -> float:
    started = time.monotonic()
    runtime.stop(info)
    return time.monotonic() - started


def run_ray(source: Path, rows: int, url: str) -> dict[str, Any]:
    """``benchmarks/ray_peer.py`` in Ray's own environment, against the server at ``url``."""
    from benchmarks.ray_env import ensure_ray_env

    python = ensure_ray_env(REPO / ".bench")
    out = BENCH / "ray-output"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(python),
        str(REPO / "benchmarks" / "ray_peer.py"),
        "--input",
        str(source),
        "--output",
        str(out),
        "--url",
        url,
        "--model",
        MODEL,
        "--request-rows",
        str(REQUEST_ROWS),
        "--actors",
        "2",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    # A stalled Ray run (actors holding every CPU, say) fails the benchmark instead of hanging it.
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, timeout=1800)
    (BENCH / "ray.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"The Ray peer failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["complete"] = result["rows"] == result["distinct_ids"] == rows
    result["sample_ok"] = sample_ok(source, [tuple(pair) for pair in result["sample"]])
    return result


def run_naive(source: Path, rows: int, url: str) -> dict[str, Any]:
    """The loop most teams write first: pandas reads everything, one synchronous infer per request."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq
    import tritonclient.grpc as grpcclient
    from transactions_data import FEATURES

    started = time.monotonic()
    frame = pd.read_parquet(source, columns=["transaction_id", *FEATURES])
    features = frame[FEATURES].to_numpy(dtype=np.float32)
    client = grpcclient.InferenceServerClient(url)
    requested = [grpcclient.InferRequestedOutput("probability")]
    scores = []
    for start in range(0, len(features), REQUEST_ROWS):
        batch = features[start : start + REQUEST_ROWS]
        item = grpcclient.InferInput("features", list(batch.shape), "FP32")
        item.set_data_from_numpy(batch)
        scores.append(client.infer(MODEL, [item], outputs=requested).as_numpy("probability")[:, 0])
    client.close()
    out = pd.DataFrame(
        {"transaction_id": frame["transaction_id"].to_numpy(), "risk_score": np.concatenate(scores)}
    )
    path = BENCH / "naive-output.parquet"
    out.to_parquet(path, index=False)
    seconds = time.monotonic() - started
    written = pq.read_table(path)
    ids = written.column("transaction_id")
    sample = sorted(zip(ids.to_pylist()[:5], written.column("risk_score").to_pylist()[:5], strict=True))
    del frame, features, out
    return {
        "seconds": seconds,
        "rows": written.num_rows,
        "complete": written.num_rows == len(set(ids.to_pylist())) == rows,
        "sample_ok": sample_ok(source, sample),
    }
