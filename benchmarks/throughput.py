"""Throughput, client CPU and memory of the inference task's code path, against baselines on one server.

One local Triton server (both demo models) serves every measurement of a run:

1. ceiling: Triton's own ``perf_analyzer`` (from the ``tritonclient==2.51.0`` wheel, the server's version,
   installed here into ``$BATCH_INFER_HOME/perf-analyzer-env``), best rows/s over a small sweep of
   request sizes and concurrencies;
2. ours: ``ChunkStreamer.run`` with the default sizes (``resolve_sizes``), chunk Parquet to output part,
   in a fresh subprocess;
3. naive: pandas reads the whole file, one synchronous ``tritonclient.grpc`` ``infer`` per batch;
4. client CPU (user + system of the client process only) per million rows, ours against perf_analyzer;
5. peak RSS of (2) on a 1M-row and a 10M-row chunk;
6. (1) and (2) again on ``risk_scorer_heavy``.

It ends with ratio lines (the machine is shared, so absolute figures are printed above them only for the
record). Usage: ``python benchmarks/throughput.py [--rows N] [--quick] [--skip-naive256]``. The workers
``ours`` and ``naive`` run one measurement and print one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_support import (
    bench_home,
    chunk_for,
    chunk_rows,
    last_json,
    local_server,
    log,
    model_counts,
    peak_rss_mb,
    ratio,
    run_child,
    self_cpu,
)
from perf_analyzer import PerfAnalyzer, ensure_perf_analyzer

MODEL = "risk_scorer"
HEAVY_MODEL = "risk_scorer_heavy"
INPUT_TENSOR = "features"
OUTPUT_TENSOR = "probability"
OUTPUT_COLUMN = "risk_score"
PASSTHROUGH = ["transaction_id"]  # as in the demo DAG


# ---------------------------------------------------------------------------------------------- workers


def worker_ours(args: argparse.Namespace) -> dict[str, Any]:
    """The inference task's code path on one chunk: contract, default sizes, ``ChunkStreamer.run``."""
    import pyarrow.parquet as pq
    from transactions_data import FEATURES

    from airflow_batch_infer.client.sizing import resolve_sizes
    from airflow_batch_infer.client.streaming import ChunkStreamer, StreamSettings
    from airflow_batch_infer.client.tensors import bind_inputs, bind_outputs
    from airflow_batch_infer.hooks.triton import TritonHook
    from airflow_batch_infer.staging import output_part_path, rejects_part_path

    cpu_start = self_cpu()
    hook = TritonHook(url=args.url)
    metadata = hook.get_model_metadata(args.model)
    config = hook.get_model_config(args.model)
    max_batch = int(config.get("max_batch_size") or 0)
    inputs = bind_inputs({INPUT_TENSOR: FEATURES}, pq.read_schema(args.chunk), metadata, max_batch)
    outputs = bind_outputs({OUTPUT_TENSOR: OUTPUT_COLUMN}, metadata, max_batch)
    request_rows, in_flight = resolve_sizes(config, args.request_rows, args.max_in_flight)
    streamer = ChunkStreamer(
        inputs=inputs,
        outputs=outputs,
        settings=StreamSettings(model_name=args.model, request_rows=request_rows, max_in_flight=in_flight),
        row_id_column="row_id",
        passthrough_columns=PASSTHROUGH,
        client_factory=hook.get_async_client,
        url=hook.url,  # as the infer operator does: shared memory when the server is on this host
        headers=hook.headers,
    )
    out_dir = Path(args.out_dir)
    cpu_before, started = self_cpu(), time.perf_counter()
    result = streamer.run(args.chunk, output_part_path(out_dir, 0), rejects_part_path(out_dir, 0), 0)
    seconds = time.perf_counter() - started
    cpu_run = self_cpu() - cpu_before
    if result.rows_out != result.rows:
        raise RuntimeError(f"ours: {result.rows_rejected} of {result.rows} rows were set aside.")
    written = pq.read_metadata(result.output_path).num_rows
    if written != result.rows:
        raise RuntimeError(f"ours: the output part holds {written} rows, expected {result.rows}.")
    return {
        "rows": result.rows,
        "seconds": seconds,
        "rows_per_s": result.rows / seconds,
        "cpu_run_s": cpu_run,
        "cpu_setup_s": cpu_before - cpu_start,
        "request_rows": request_rows,
        "max_in_flight": in_flight,
        "requests": result.requests,
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_naive(args: argparse.Namespace) -> dict[str, Any]:
    """The loop most teams write first: pandas, one synchronous ``infer`` per batch, collect, write."""
    import numpy as np
    import pandas as pd
    import tritonclient.grpc as grpcclient
    from transactions_data import FEATURES

    client = grpcclient.InferenceServerClient(args.url)
    requested = [grpcclient.InferRequestedOutput(OUTPUT_TENSOR)]
    out_path = Path(args.out_dir) / "naive.parquet"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cpu_before, started = self_cpu(), time.perf_counter()
    frame = pd.read_parquet(args.chunk)
    if args.limit:
        frame = frame.iloc[: args.limit]
    features = frame[FEATURES].to_numpy(dtype=np.float32)
    scores = []
    for start in range(0, len(features), args.batch):
        batch = features[start : start + args.batch]
        item = grpcclient.InferInput(INPUT_TENSOR, list(batch.shape), "FP32")
        item.set_data_from_numpy(batch)
        result = client.infer(args.model, [item], outputs=requested)
        scores.append(result.as_numpy(OUTPUT_TENSOR))
    out = pd.DataFrame(
        {
            "row_id": frame["row_id"].to_numpy(),
            "transaction_id": frame["transaction_id"].to_numpy(),
            OUTPUT_COLUMN: np.concatenate(scores)[:, 0],
        }
    )
    out.to_parquet(out_path, index=False)
    seconds = time.perf_counter() - started
    client.close()
    return {
        "rows": len(frame),
        "seconds": seconds,
        "rows_per_s": len(frame) / seconds,
        "cpu_run_s": self_cpu() - cpu_before,
        "batch": args.batch,
        "peak_rss_mb": peak_rss_mb(),
    }


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class Bench:
    """A started server and what the measurements share.

    :param grpc_url: the server.
    :param work: where the workers write their parts.
    :param perf_analyzer: the ceiling's tool, against the same server.
    """

    grpc_url: str
    work: Path
    perf_analyzer: PerfAnalyzer

    def worker(self, kind: str, chunk: Path, model: str, *extra: str) -> dict[str, Any]:
        """Run a worker in a fresh subprocess; its JSON result plus its process's CPU and RSS high-water."""
        out_dir = self.work / f"{kind}-{model}-{chunk.parent.parent.parent.name}"
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), kind, "--chunk", str(chunk)]
        cmd += ["--url", self.grpc_url, "--model", model, "--out-dir", str(out_dir), *extra]
        before = model_counts(self.grpc_url, model)
        child = run_child(cmd, timeout=400)
        after = model_counts(self.grpc_url, model)
        shutil.rmtree(out_dir, ignore_errors=True)
        if child.returncode != 0:
            raise RuntimeError(f"worker {kind} exited {child.returncode}:\n{child.output[-4000:]}")
        result = last_json(child.output)
        result.update(
            process_cpu_s=child.cpu_s,
            wall_s=child.wall_s,
            server_rows=after[0] - before[0],
            server_execs=after[1] - before[1],
        )
        return result


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda r: r["rows_per_s"])


def drive(args: argparse.Namespace) -> None:
    """Start the server, run every measurement, print the figures and the ratio lines."""
    from airflow_batch_infer.client.sizing import resolve_sizes
    from airflow_batch_infer.hooks.triton import TritonHook

    wall_started = time.monotonic()
    quick = args.quick
    rows = args.rows if args.rows else (200_000 if quick else 2_000_000)
    rss_small, rss_large = (100_000, 1_000_000) if quick else (1_000_000, 10_000_000)
    naive256_rows = min(rows, args.naive256_rows) if args.naive256_rows else rows
    batches = [4096] if quick else [1024, 4096, 8192]
    concurrencies = [2, 8] if quick else [2, 4, 8]
    repeats = 1 if quick else args.repeats

    home = bench_home()
    pa_binary, pa_env = ensure_perf_analyzer(home)
    chunk = chunk_for(rows)
    chunks_rss = {n: chunk_for(n) for n in (rss_small, rss_large)} if not args.skip_rss else {}

    work = home / "bench-work" / f"run-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    # No restricted-API key: perf_analyzer and the worker processes, given only the address, use its shared
    # memory as they would a server of their own (the key costs nothing per request; the infer task sends it).
    try:
        with local_server([MODEL, HEAVY_MODEL], home / "servers", restricted_api=False) as info:
            log(f"server ready at {info.grpc_url} ({time.monotonic() - wall_started:.1f} s since start)")
            window_ms = 500 if quick else 1000
            pa = PerfAnalyzer(pa_binary, pa_env, info.grpc_url, work, window_ms)
            bench = Bench(info.grpc_url, work, pa)
            hook = TritonHook(url=info.grpc_url)
            sizes = {m: resolve_sizes(hook.get_model_config(m), None, None) for m in (MODEL, HEAVY_MODEL)}
            hook.close()
            log(f"default sizes (request rows, in flight): {sizes}")
            report = run_all(
                bench, args, chunk, chunks_rss, sizes, batches, concurrencies, repeats, naive256_rows
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = time.monotonic() - wall_started
    print_report(report)


def run_all(
    bench: Bench,
    args: argparse.Namespace,
    chunk: Path,
    chunks_rss: dict[int, Path],
    sizes: dict[str, tuple[int, int]],
    batches: list[int],
    concurrencies: list[int],
    repeats: int,
    naive256_rows: int,
) -> dict[str, Any]:
    """Every measurement, against the running server; returns the figures."""
    report: dict[str, Any] = {"rows": chunk_rows(chunk)}
    request_rows, in_flight = sizes[MODEL]
    # (1) ceiling: the sweep, with ours's request size and in-flight count always in it.
    pa_batches = sorted({*batches, request_rows})
    pa_conc = sorted({*concurrencies, in_flight})
    pa_runs = bench.perf_analyzer.sweep(MODEL, pa_batches, pa_conc)
    report["pa_runs"] = pa_runs
    report["pa_best"] = max(pa_runs, key=lambda r: r.rows_per_s)
    # (4) perf_analyzer's CPU at ours's request size and in-flight count.
    report["pa_cpu"] = next(r for r in pa_runs if (r.batch, r.concurrency) == (request_rows, in_flight))

    # (2) ours and (3) the naive baselines, best of `repeats` fresh processes each, interleaved so that
    # a busy spell on the shared machine does not fall on one of them only.
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "naive4096": [], "naive256": []}
    limit256 = ["--limit", str(naive256_rows)] if naive256_rows < report["rows"] else []
    for _ in range(repeats):
        runs["ours"].append(bench.worker("ours", chunk, MODEL))
        if not args.skip_naive4096:
            runs["naive4096"].append(bench.worker("naive", chunk, MODEL, "--batch", "4096"))
        if not args.skip_naive256:
            runs["naive256"].append(bench.worker("naive", chunk, MODEL, "--batch", "256", *limit256))
    for name, results in runs.items():
        for r in results:
            log(f"{name} {MODEL}: {r['rows_per_s']:,.0f} rows/s, {r['cpu_run_s']:.2f} s CPU")
        if results:
            report[name] = best(results)

    # (5) memory: fresh processes on a small and a large chunk.
    for n, path in chunks_rss.items():
        r = bench.worker("ours", path, MODEL)
        report[f"rss_{n}"] = r
        log(f"ours on {n:,} rows: peak RSS {r['peak_rss_mb']:.0f} MB, {r['rows_per_s']:,.0f} rows/s")

    # (6) the heavy model: ceiling and ours.
    if not args.skip_heavy:
        heavy_rows, heavy_in_flight = sizes[HEAVY_MODEL]
        heavy_runs = bench.perf_analyzer.sweep(
            HEAVY_MODEL, sorted({*batches, heavy_rows}), sorted({*concurrencies, heavy_in_flight})
        )
        report["heavy_pa_best"] = max(heavy_runs, key=lambda r: r.rows_per_s)
        heavy_chunk = chunk_for(args.heavy_rows) if args.heavy_rows else chunk
        report["heavy_ours"] = best([bench.worker("ours", heavy_chunk, HEAVY_MODEL) for _ in range(repeats)])
        log(f"ours {HEAVY_MODEL}: {report['heavy_ours']['rows_per_s']:,.0f} rows/s")
    return report


def print_report(report: dict[str, Any]) -> None:
    """Absolute figures for the record, then the ratio lines."""
    ours, pa_best, pa_cpu = report["ours"], report["pa_best"], report["pa_cpu"]
    naive256, naive4096 = report.get("naive256"), report.get("naive4096")
    cpu_ours = ours["cpu_run_s"] / ours["rows"] * 1e6
    cpu_pa = pa_cpu.cpu_s / pa_cpu.rows_served * 1e6 if pa_cpu.rows_served else float("nan")
    avg_batch = ours["server_rows"] / ours["server_execs"] if ours["server_execs"] else 0.0
    sweep = ", ".join(f"b{r.batch}/c{r.concurrency} {r.rows_per_s / 1e6:.2f}M" for r in report["pa_runs"])
    lines = [
        f"total wall {report['wall_s']:.0f} s; main chunk {report['rows']:,} rows",
        f"perf_analyzer {MODEL} sweep (rows/s): {sweep}",
        f"ceiling {MODEL}: {pa_best.rows_per_s:,.0f} rows/s (-b {pa_best.batch}, c {pa_best.concurrency})",
        f"ours {MODEL}: {ours['rows_per_s']:,.0f} rows/s ({ours['rows']:,} rows in {ours['seconds']:.2f} s; "
        f"{ours['request_rows']} rows a request, {ours['max_in_flight']} in flight)",
    ]
    for name, r in (("naive4096", naive4096), ("naive256", naive256)):
        if r:
            lines.append(
                f"{name}: {r['rows_per_s']:,.0f} rows/s ({r['rows']:,} rows in {r['seconds']:.2f} s)"
            )
    lines += [
        f"client CPU s per million rows: ours {cpu_ours:.3f} (during run(); whole process "
        f"{ours['process_cpu_s']:.2f} s), perf_analyzer {cpu_pa:.3f} (-b {pa_cpu.batch}, c "
        f"{pa_cpu.concurrency}: {pa_cpu.cpu_s:.2f} s, {pa_cpu.rows_served:,} rows served)",
        f"server during ours: {ours['server_rows']:,} rows in {ours['server_execs']:,} executions",
    ]
    rss = sorted((int(k[4:]), v["peak_rss_mb"]) for k, v in report.items() if k.startswith("rss_"))
    lines += [f"ours peak RSS (VmHWM) on {n:,} rows: {mb:.0f} MB" for n, mb in rss]
    heavy, heavy_pa = report.get("heavy_ours"), report.get("heavy_pa_best")
    if heavy and heavy_pa:
        lines.append(
            f"{HEAVY_MODEL}: ceiling {heavy_pa.rows_per_s:,.0f} rows/s (-b {heavy_pa.batch}, c "
            f"{heavy_pa.concurrency}); ours {heavy['rows_per_s']:,.0f} rows/s ({heavy['rows']:,} rows)"
        )
    rss_small, rss_large = (rss[0][1], rss[-1][1]) if len(rss) == 2 else (None, None)
    lines += [
        f"ours/ceiling={ratio(ours['rows_per_s'], pa_best.rows_per_s)}",
        f"ours/naive256={ratio(ours['rows_per_s'], naive256 and naive256['rows_per_s'])}",
        f"ours/naive4096={ratio(ours['rows_per_s'], naive4096 and naive4096['rows_per_s'])}",
        f"cpu_ours/cpu_pa={ratio(cpu_ours, cpu_pa)}",
        f"rss_10m/1m={ratio(rss_large, rss_small)}",
        f"rss_10m_mb={rss_large:.0f}" if rss_large is not None else "rss_10m_mb=nan",
        f"heavy_ours/ceiling={ratio(heavy and heavy['rows_per_s'], heavy_pa and heavy_pa.rows_per_s)}",
        f"server_avg_batch={avg_batch:.0f}",
    ]
    print("\n".join(lines), flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=0, help="rows of the main chunk (default 2,000,000)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (200k rows, short sweep)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh runs of ours and naive; best counts")
    parser.add_argument(
        "--naive256-rows",
        type=int,
        default=500_000,
        help="time naive256 on this prefix of the chunk (0: whole chunk); its server waits out the "
        "batcher's queue delay on each small request, so it is slow",
    )
    parser.add_argument("--heavy-rows", type=int, default=0, help="chunk rows for the heavy model")
    parser.add_argument("--skip-naive256", action="store_true")
    parser.add_argument("--skip-naive4096", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-heavy", action="store_true")
    sub = parser.add_subparsers(dest="command")
    for name in ("ours", "naive"):
        worker = sub.add_parser(name, help=f"worker: one {name} run, one JSON line")
        worker.add_argument("--chunk", required=True)
        worker.add_argument("--url", required=True)
        worker.add_argument("--model", required=True)
        worker.add_argument("--out-dir", required=True)
        if name == "ours":
            worker.add_argument("--request-rows", default=None)
            worker.add_argument("--max-in-flight", default=None)
        else:
            worker.add_argument("--batch", type=int, required=True)
            worker.add_argument("--limit", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "ours":
        print(json.dumps(worker_ours(args)), flush=True)
    elif args.command == "naive":
        print(json.dumps(worker_naive(args)), flush=True)
    else:
        drive(args)


if __name__ == "__main__":
    main()
