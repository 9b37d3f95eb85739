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
- ``rss_max_mb``: the largest peak RSS of a task process; ``slot_held_max_s``: the longest an executor slot
  stayed taken after its task had ended (``airflow_batch_infer/slot_release.py`` says why it can be seconds);
- with ``--large [N]`` (default 100,000,000 rows, as many files), the large run: the same DAG under the
  scheduler on N rows, then ``stage_100m/stage_10m`` (the stage step of the two scheduler runs, what a user
  waits for), ``stage_code_100m/stage_code_10m`` (stage's own code alone, best of three: footers and
  manifest), ``run_100m/run_10m`` (the scheduler runs' wall times) and ``rss_max_mb_100m``.

``--baseline REV`` also runs (1) and (2) on a worktree of git revision ``REV`` (its DAGs and package), one
after the other with this tree's, and prints this tree's ratios to it.

``--idle-sleep S`` sets the scheduler's ``scheduler_idle_sleep_time`` (Airflow's default: 1 s), which bounds
how long it sleeps, with nothing to do, before it sees that a task has ended.

``--sink s3_parquet`` has the DAG runs commit to a Parquet dataset on local disk (the ``s3_parquet`` sink, a
fresh one under each run's home: persist copies the parts into a new version and switches one pointer)
instead of loading the DuckDB warehouse: what a run's serial part is when the commit writes no rows.

Usage: ``python benchmarks/e2e.py [--rows N] [--large [N]] [--baseline REV] [--chunk-rows N] [--skip-ray]
[--skip-naive] [--skip-scheduler] [--skip-dags-test] [--sink {duckdb,s3_parquet}]
[--idle-sleep S]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_common import BENCH, LOGICAL_DATE, REPO, STEPS, ensure_input, log, ratio
from e2e_dag_runs import baseline_tree, run_dags_test, run_scheduler
from e2e_peers import run_naive, run_ray, start_server, stop_server


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
        "--large", type=int, nargs="?", const=100_000_000, default=0, help="also run the DAG on N rows"
    )
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-scheduler", action="store_true")
    parser.add_argument("--skip-dags-test", action="store_true")
    parser.add_argument("--baseline", help="git revision whose DAG runs are measured beside this tree's")
    parser.add_argument("--chunk-rows", type=int, help="the demo's chunk_rows Param (default: its own)")
    parser.add_argument("--sink", choices=("duckdb", "s3_parquet"), default="duckdb", help="what runs load")
    parser.add_argument(
        "--idle-sleep", type=float, help="the scheduler's scheduler_idle_sleep_time (default: Airflow's, 1 s)"
    )
    args = parser.parse_args()
    rows = args.rows
    source = ensure_input(rows)
    report: dict[str, Any] = {"rows": rows}
    conf: dict[str, Any] = {"input_path": str(source), "partition": LOGICAL_DATE, "table": "bench_scores"}
    if args.chunk_rows:
        conf["chunk_rows"] = args.chunk_rows
    if args.sink != "duckdb":
        conf["sink"] = args.sink  # its sink_options: a dataset under each run's home (with_sink_home)
        report["sink"] = args.sink
    trees = {"": REPO}
    if args.baseline:
        trees["baseline_"] = baseline_tree(args.baseline)
    for prefix, tree in trees.items():
        if not args.skip_dags_test:
            log(f"{prefix}airflow dags test ({tree}) ...")
            report[f"{prefix}dags_test"] = run_dags_test(source, rows, tree, conf)
            print_steps(f"{prefix}dags test", report[f"{prefix}dags_test"]["steps"], rows)
        if not args.skip_scheduler:
            log(f"{prefix}scheduler (LocalExecutor, parallelism 2) ...")
            report[f"{prefix}scheduler"] = run_scheduler(source, rows, tree, conf, args.idle_sleep)
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
        large_conf = conf | {"input_path": str(ensure_input(args.large))}
        log(f"large run: scheduler on {args.large:,} rows ...")
        report["large_scheduler"] = run_scheduler(
            ensure_input(args.large), args.large, REPO, large_conf, args.idle_sleep
        )
        print_steps("large scheduler", report["large_scheduler"]["steps"], args.large)
        report["stage"] = stage_scaling(rows, args.large)

    (BENCH / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    print_ratios(report)


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
        lines.append(f"slot_held_max_s={max(sched.get('slot_held_s', {}).values(), default=0):.2f}")
    if ray and report.get("dags_test"):
        dags = report["dags_test"]["steps"]
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
    large = report.get("large_scheduler")
    if large and sched:
        lines.append(f"stage_100m/stage_10m={large['steps']['stage'] / sched['steps']['stage']:.2f}")
        lines.append(f"run_100m/run_10m={large['steps']['run_wall'] / sched['steps']['run_wall']:.2f}")
        lines.append(f"rss_max_mb_100m={max(large['rss_mb'].values(), default=0)}")
    if report.get("stage"):
        stage = report["stage"]
        lines.append(f"stage_code_100m/stage_code_10m={stage['stage_large_s'] / stage['stage_small_s']:.2f}")
    checks = [r["check"] for key, r in report.items() if key.endswith(("dags_test", "scheduler"))]
    checks += [r for r in (ray, report.get("naive")) if r]
    lines.append(f"all_rows_once={all(c['complete'] and c['sample_ok'] for c in checks)}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
