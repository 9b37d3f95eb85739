"""Rows/s of the infer step over 1 and N servers, side by side in one run; on a GPU host, also GPU use and
batch fill.

It does what a run's infer phase does, without the scheduler: the start operator starts the fleet
(``servers``), the input is staged into one chunk per parallel task, and ``--tasks`` infer operators run at
once, each in its own process as Airflow runs them, each sent to its server round robin. For each fleet size
it prints the infer phase's rows/s (all rows over the phase's wall time), each server's rows and average
batch (rows over model executions, from Triton's statistics) and, where ``nvidia-smi`` exists, the GPUs'
mean utilisation while the phase ran. It ends with ``servers_N/servers_1=`` (rows/s ratio).

    python benchmarks/servers.py                              # 1 and 2 local servers, risk_scorer, 4M rows
    python benchmarks/servers.py --servers auto --model risk_scorer_heavy --rows 20000000   # a GPU host
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "dags")]

from transactions_data import FEATURES, write_transactions  # noqa: E402

from airflow_batch_infer.operators.infer import TritonInferenceOperator  # noqa: E402
from airflow_batch_infer.operators.server import StartTritonServerOperator, StopTritonServerOperator  # noqa: E402
from airflow_batch_infer.runtimes.fleet import fleet_servers  # noqa: E402
from airflow_batch_infer.runtimes.statistics import server_work  # noqa: E402
from airflow_batch_infer.staging import stage_parquet  # noqa: E402


class GpuSampler(threading.Thread):
    """Mean GPU utilisation (%) from ``nvidia-smi``, sampled every half second while it runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        smi = shutil.which("nvidia-smi")
        while smi and not self.done.wait(0.5):
            out = subprocess.run(
                [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            values = [float(v) for v in out.split() if v.strip().replace(".", "", 1).isdigit()]
            if values:
                self.samples.append(statistics.mean(values))

    def mean(self) -> float | None:
        self.done.set()
        self.join(timeout=5)
        return statistics.mean(self.samples) if self.samples else None


def infer_chunk(fleet: dict[str, Any], chunk: dict[str, Any], model: str) -> dict[str, Any]:
    """One infer task, in a process of its own."""
    return TritonInferenceOperator(
        task_id="infer",
        chunk=chunk,
        server=fleet,
        model_name=model,
        inputs={"features": FEATURES},
        outputs={"probability": "risk_score"},
    ).execute({})


def measure(servers: int | str, args: argparse.Namespace, source: Path, work: Path) -> dict[str, Any]:
    start = StartTritonServerOperator(
        task_id="start_server",
        model_repository=str(REPO / "triton_models"),
        models=[args.model],
        runtime=args.runtime,
        runtime_options={"work_root": str(work / "servers")} if args.runtime == "local" else {},
        servers=servers,
    )
    started = time.monotonic()
    fleet = json.loads(json.dumps(start.execute({})))
    start_seconds = time.monotonic() - started
    try:
        manifest = stage_parquet(source, work / f"run-{servers}", chunk_rows=-(-args.rows // args.tasks))
        chunks = [c.to_dict() for c in manifest.chunks]
        sampler = GpuSampler()
        sampler.start()
        began = time.monotonic()
        with ProcessPoolExecutor(args.tasks, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(infer_chunk, [fleet] * len(chunks), chunks, [args.model] * len(chunks)))
        seconds = time.monotonic() - began
        gpu = sampler.mean()
        rows = sum(r["rows_out"] for r in results)
        assert rows == args.rows, (rows, args.rows)
        work_done = {s.handle["server_id"]: server_work(s) for s in fleet_servers(fleet)}
    finally:
        StopTritonServerOperator(task_id="stop_server", server=fleet).execute({})
    return {
        "servers": len(fleet_servers(fleet)),
        "start_seconds": start_seconds,
        "infer_seconds": seconds,
        "rows_per_second": rows / seconds,
        "gpu_utilisation": gpu,
        "per_server": {
            k: {"rows": w.get("inference_count"), "avg_batch": w["inference_count"] / w["executions"]}
            for k, w in work_done.items()
            if w.get("executions")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--tasks", type=int, default=2, help="infer tasks at once (the executor's slots)")
    parser.add_argument("--servers", default="2", help="the fleet beside one server: a number or 'auto'")
    parser.add_argument("--model", default="risk_scorer")
    parser.add_argument("--runtime", default="local", choices=["local", "docker"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-servers-") as folder:
        work = Path(folder)
        write_transactions(work / "in", args.rows, files=max(2, args.tasks))
        results = [measure(1, args, work / "in", work), measure(args.servers, args, work / "in", work)]
    for r in results:
        gpu = f", GPU {r['gpu_utilisation']:.0f} %" if r["gpu_utilisation"] is not None else ", no GPU"
        print(
            f"{r['servers']} server(s): start {r['start_seconds']:.1f} s, infer {r['infer_seconds']:.2f} s, "
            f"{r['rows_per_second']:,.0f} rows/s{gpu}; per server: "
            + ", ".join(
                f"{k} {v['rows']:,} rows, avg batch {v['avg_batch']:.0f}" for k, v in r["per_server"].items()
            )
        )
    one, many = results
    print(f"servers_{many['servers']}/servers_1={many['rows_per_second'] / one['rows_per_second']:.2f}")


if __name__ == "__main__":
    main()
