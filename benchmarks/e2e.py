"""The whole DAG, step by step, beside Ray Data and a naive loop on the same files and the same server.

What a user waits for is the whole run, not the inner loop. On ``N`` generated transactions (8 Parquet
files; ``--rows`` or ``BENCH_ROWS``, default 10,000,000) this runs, one after the other:

1. ``airflow dags test batch_inference_demo`` (every task in one process, one after the other: stage and
   start_server do not overlap there), with the time of each step read from the metadata database;
2. the same DAG under a real scheduler with the LocalExecutor (``[core] parallelism`` 2, PostgreSQL
   metadata database, api-server and dag-processor: ``tests/distributed/cluster.py``), where stage and
   start_server run at once, triggered through the REST API after one small unmeasured run (a deployed
   api-server is warm); each task process's peak RSS is sampled;
3. Ray Data as a Ray user writes it (``read_parquet`` → ``map_batches`` with an actor pool calling the same
   local Triton server over gRPC with the model's request size → ``write_parquet``), in its own
   environment under ``.bench/`` (``benchmarks/ray_peer.py``), against a server started by our local
   runtime, whose start and stop are timed too;
4. the naive loop most teams write first (pandas reads everything, one synchronous ``infer`` per
   32,768 rows, one Parquet file out).

Every run's output is checked: row count, distinct ids, and a sample of scores against the model run
directly. It ends with ratio lines (absolute times on a shared machine are noise):

- ``data_path/ray``: rows/s from stage start to persist end (scheduler run) over Ray's from read to write;
- ``whole_run/ray``: rows/s of the scheduler's whole run (start to end, server start and stop included)
  over Ray's from ``ray.init`` to ``ray.shutdown`` plus the server's start and stop;
- ``serial_fraction``: stage + persist + stop_server over the run's wall time (scheduler run);
- ``stage_100m/stage_10m`` with ``--large`` (a second input of 100,000,000 rows); ``rss_max_mb``: the
  largest peak RSS of a task process.

``--baseline REV`` also runs (1) and (2) on a worktree of git revision ``REV`` (its DAGs and package), one
after the other with this tree's, and prints this tree's ratios to it.

Usage: ``python benchmarks/e2e.py [--rows N] [--large [N]] [--baseline REV] [--chunk-rows N] [--skip-ray]
[--skip-naive] [--skip-scheduler]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
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

sys.path.insert(0, str(REPO / "dags"))
sys.path.insert(0, str(REPO))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


# ------------------------------------------------------------------------------------------------ data


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


def tree_env(tree: Path) -> dict[str, str]:
    """Settings that make Airflow run ``tree``'s DAGs and package (this checkout, or a baseline worktree)."""
    return {"AIRFLOW__CORE__DAGS_FOLDER": str(tree / "dags"), "PYTHONPATH": str(tree)}


def base_env(home: Path, airflow_home: Path, tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(tree_env(tree))
    env.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "BATCH_INFER_HOME": str(home),
            "BATCH_INFER_TRITON_ENV": os.environ.get(
                "BATCH_INFER_TRITON_ENV", str(REPO / ".data" / "triton-server-env")
            ),
        }
    )
    return env


def check_table(database: Path, table: str, partition: str, rows: int) -> dict[str, Any]:
    """Rows, distinct ids and a score sample of the run's partition, the sample checked against the model."""
    import duckdb

    with duckdb.connect(str(database), read_only=True) as con:
        count, distinct = con.execute(
            f'SELECT count(*), count(DISTINCT transaction_id) FROM "{table}" WHERE batch_partition = $p',
            {"p": partition},
        ).fetchone()
        sample = con.execute(
            f'SELECT transaction_id, risk_score FROM "{table}" WHERE batch_partition = $p '
            "ORDER BY transaction_id LIMIT 5",
            {"p": partition},
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


# ----------------------------------------------------------------------------------------- dags test


def steps_from_tis(tis: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of each step (first start to last end over its task instances) and of the whole run."""
    spans: dict[str, list[float]] = {}
    for ti in tis:
        step = ti["task_id"].split(".")[-1]
        if ti.get("start_date") and ti.get("end_date"):
            spans.setdefault(step, []).extend([_ts(ti["start_date"]), _ts(ti["end_date"])])
    steps = {step: max(v) - min(v) for step, v in spans.items()}
    every = [t for v in spans.values() for t in v]
    steps["tasks_wall"] = max(every) - min(every) if every else 0.0
    if "stage" in spans and "persist" in spans:
        steps["data_path"] = max(spans["persist"]) - min(spans["stage"])
    return steps


def _ts(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def run_dags_test(source: Path, rows: int, tree: Path, conf: dict[str, Any]) -> dict[str, Any]:
    """``airflow dags test`` of ``tree``'s demo DAG; step times from the SQLite metadata database."""
    import sqlite3

    root = BENCH / f"dags-test-{tree.name}"
    home, airflow_home = root / "home", root / "airflow"
    shutil.rmtree(home, ignore_errors=True)
    env = base_env(home, airflow_home, tree)
    airflow = str(Path(sys.executable).with_name("airflow"))
    if not (airflow_home / "airflow.db").exists():
        airflow_home.mkdir(parents=True, exist_ok=True)
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    started = time.monotonic()
    done = subprocess.run(
        [airflow, "dags", "test", DAG_ID, LOGICAL_DATE, "-c", json.dumps(conf)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - started
    (root / "dags-test.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"airflow dags test failed:\n{(done.stdout + done.stderr)[-4000:]}")
    with sqlite3.connect(airflow_home / "airflow.db") as db:
        run_id = db.execute(
            "SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (DAG_ID,)
        ).fetchone()[0]
        tis = [
            {"task_id": t, "start_date": s, "end_date": e}
            for t, s, e in db.execute(
                "SELECT task_id, start_date, end_date FROM task_instance WHERE dag_id = ? AND run_id = ?",
                (DAG_ID, run_id),
            )
        ]
    check = check_table(home / "warehouse.duckdb", "bench_scores", LOGICAL_DATE, rows)
    check["sample_ok"] = sample_ok(source, check["sample"])
    return {"command_s": wall, "steps": steps_from_tis(tis), "check": check, "chunks": _chunks(tis)}


def _chunks(tis: list[dict[str, Any]]) -> int:
    return sum(1 for ti in tis if ti["task_id"].endswith(".infer"))


# ------------------------------------------------------------------------------------ real scheduler


class RssSampler(threading.Thread):
    """Peak RSS (``VmHWM``) of each task process (``airflow worker -- <ti id>``), sampled every 0.1 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[str, float] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.1):
            for proc in Path("/proc").glob("[0-9]*"):
                with contextlib.suppress(OSError):
                    cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if not cmdline.startswith("airflow worker -- "):
                        continue
                    ti_id = cmdline.split("-- ", 1)[1].strip()
                    for line in (proc / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            mb = int(line.split()[1]) / 1024
                            self.peaks[ti_id] = max(self.peaks.get(ti_id, 0.0), mb)

    def finish(self) -> None:
        self._done.set()
        self.join()


def run_scheduler(source: Path, rows: int, tree: Path, conf: dict[str, Any]) -> dict[str, Any]:
    """``tree``'s demo DAG under a scheduler with the LocalExecutor (parallelism 2), triggered by the REST
    API."""
    from tests.distributed.cluster import CeleryCluster, services_missing

    missing = services_missing()
    if missing:
        raise RuntimeError(f"The scheduler run needs PostgreSQL: {missing}")
    root = BENCH / f"scheduler-{tree.name}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cluster = CeleryCluster(root, executor="LocalExecutor", parallelism=2, extra_env=tree_env(tree))
    sampler = RssSampler()
    try:
        cluster.start()
        cluster.wait_for_dag(DAG_ID)  # and unpaused
        # A deployed api-server is warm: its first execution API call here took 5 s (and was retried).
        warm = conf | {"input_path": str(ensure_input(WARMUP_ROWS)), "partition": "warm-up"}
        warm_state = cluster.wait_for_run(
            DAG_ID, cluster.trigger(DAG_ID, warm, run_id="warm_up"), timeout=600
        )
        if warm_state != "success":
            raise RuntimeError(f"The warm-up run ended {warm_state}.")
        sampler.start()
        run_id = cluster.trigger(DAG_ID, conf, run_id=f"bench_{int(time.time())}")
        state = cluster.wait_for_run(DAG_ID, run_id, timeout=1800)
        sampler.finish()
        run = cluster.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
        tis = cluster.task_instances(DAG_ID, run_id)
        if state != "success":
            raise RuntimeError(
                f"The scheduler run ended {state}: {[(t['task_id'], t['state']) for t in tis]}"
            )
        check = check_table(cluster.batch_infer_home / "warehouse.duckdb", "bench_scores", LOGICAL_DATE, rows)
        check["sample_ok"] = sample_ok(source, check["sample"])
        by_id = {t["id"]: f"{t['task_id'].split('.')[-1]}[{t.get('map_index', -1)}]" for t in tis}
        peaks = {by_id[ti_id]: round(mb) for ti_id, mb in sampler.peaks.items() if ti_id in by_id}
        steps = steps_from_tis(tis)
        steps["run_wall"] = _ts(run["end_date"]) - _ts(run["start_date"])
        return {"steps": steps, "check": check, "rss_mb": peaks, "chunks": _chunks(tis)}
    finally:
        if sampler.is_alive():
            sampler.finish()
        cluster.stop()


# ---------------------------------------------------------------------------------------- peers


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


# ---------------------------------------------------------------------------------------------- main


def print_steps(name: str, steps: dict[str, float], rows: int) -> None:
    cells = "  ".join(
        f"{s} {steps[s]:.1f}" for s in (*STEPS, "data_path", "tasks_wall", "run_wall") if s in steps
    )
    log(f"{name}: {cells}  (s; {rows / steps['tasks_wall']:,.0f} rows/s over the tasks)")


def main() -> None:
    # A SIGTERM (a timeout, a kill) unwinds like an exception, so that the cluster and servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=int(os.environ.get("BENCH_ROWS", "10000000")))
    parser.add_argument(
        "--large", type=int, nargs="?", const=100_000_000, default=0, help="also stage N rows"
    )
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-scheduler", action="store_true")
    parser.add_argument("--baseline", help="git revision whose DAG runs are measured beside this tree's")
    parser.add_argument("--chunk-rows", type=int, help="the demo's chunk_rows Param (default: its own)")
    args = parser.parse_args()
    rows = args.rows
    source = ensure_input(rows)
    report: dict[str, Any] = {"rows": rows}
    conf: dict[str, Any] = {"input_path": str(source), "partition": LOGICAL_DATE, "table": "bench_scores"}
    if args.chunk_rows:
        conf["chunk_rows"] = args.chunk_rows
    trees = {"": REPO}
    if args.baseline:
        trees["baseline_"] = baseline_tree(args.baseline)
    for prefix, tree in trees.items():
        log(f"{prefix}airflow dags test ({tree}) ...")
        report[f"{prefix}dags_test"] = run_dags_test(source, rows, tree, conf)
        print_steps(f"{prefix}dags test", report[f"{prefix}dags_test"]["steps"], rows)
        if not args.skip_scheduler:
            log(f"{prefix}scheduler (LocalExecutor, parallelism 2) ...")
            report[f"{prefix}scheduler"] = run_scheduler(source, rows, tree, conf)
            print_steps(f"{prefix}scheduler", report[f"{prefix}scheduler"]["steps"], rows)
    if not (args.skip_ray and args.skip_naive):
        runtime, info, start_s = start_server()
        try:
            if not args.skip_ray:
                log("Ray Data ...")
                report["ray"] = run_ray(source, rows, info.grpc_url)
            if not args.skip_naive:
                log("naive loop ...")
                report["naive"] = run_naive(source, rows, info.grpc_url)
        finally:
            report["peer_server"] = {"start_s": start_s, "stop_s": stop_server(runtime, info)}
    if args.large:
        report["stage"] = stage_scaling(rows, args.large)

    (BENCH / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    print_ratios(report)


def baseline_tree(revision: str) -> Path:
    """A worktree of ``revision`` under ``.bench/``, made once (its DAGs and package; this tree's venv)."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", revision], capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = REPO / ".bench" / f"tree-{sha}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), sha], check=True)
        # Byte-compiled like this checkout (make setup): neither side pays for compiling its imports.
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(tree / "airflow_batch_infer"), str(tree / "dags")]
        )
    return tree


def stage_scaling(rows: int, large: int) -> dict[str, float]:
    """Stage alone (the operator's code path), best of three after one unmeasured run (imports), on the
    benchmark's input and on ``large`` rows in as many files."""
    from airflow_batch_infer.staging import stage_parquet

    sources = {n: ensure_input(n) for n in (rows, large)}
    stage_parquet(sources[rows], BENCH / "stage-warm-up", chunk_rows="auto", parallel_tasks=2)
    seconds = {}
    for n, source in sources.items():
        times = []
        for _ in range(3):
            started = time.monotonic()
            stage_parquet(source, BENCH / f"stage-{n}", chunk_rows="auto", parallel_tasks=2)
            times.append(time.monotonic() - started)
        seconds[n] = min(times)
    return {"stage_small_s": seconds[rows], "stage_large_s": seconds[large], "large_rows": large}


def print_ratios(report: dict[str, Any]) -> None:
    rows = report["rows"]
    sched = report.get("scheduler")
    ray = report.get("ray")
    server = report.get("peer_server", {})
    lines = []
    if sched and ray:
        ours_data = rows / sched["steps"]["data_path"]
        ray_data = rows / ray["read_to_write_s"]
        ours_whole = rows / sched["steps"]["run_wall"]
        ray_whole = rows / (ray["total_s"] + server.get("start_s", 0) + server.get("stop_s", 0))
        lines += [
            f"data_path/ray={ratio(ours_data, ray_data)}",
            f"whole_run/ray={ratio(ours_whole, ray_whole)}",
        ]
    if sched:
        steps = sched["steps"]
        serial = sum(steps.get(s, 0.0) for s in ("stage", "persist", "stop_server"))
        lines.append(f"serial_fraction={serial / steps['run_wall']:.2f}")
        lines.append(f"rss_max_mb={max(sched['rss_mb'].values(), default=0)}")
    dags = report["dags_test"]["steps"]
    if ray:
        lines.append(
            f"dags_test_data_path/ray={ratio(rows / dags['data_path'], rows / ray['read_to_write_s'])}"
        )
    if report.get("naive") and sched:
        lines.append(
            f"data_path/naive={ratio(rows / sched['steps']['data_path'], rows / report['naive']['seconds'])}"
        )
    for name in ("dags_test", "scheduler"):
        base = report.get(f"baseline_{name}")
        if base and report.get(name):
            for step in ("data_path", "run_wall"):
                if step in base["steps"] and step in report[name]["steps"]:
                    lines.append(
                        f"{name}_{step}/baseline={ratio(base['steps'][step], report[name]['steps'][step])}"
                    )
    if report.get("stage"):
        stage = report["stage"]
        lines.append(f"stage_100m/stage_10m={stage['stage_large_s'] / stage['stage_small_s']:.2f}")
    checks = [r["check"] for key, r in report.items() if key.endswith(("dags_test", "scheduler"))]
    checks += [r for r in (ray, report.get("naive")) if r]
    lines.append(f"all_rows_once={all(c['complete'] and c['sample_ok'] for c in checks)}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
