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
import contextlib
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO / "triton_models"
MODEL = "risk_scorer"
HEAVY_MODEL = "risk_scorer_heavy"
INPUT_TENSOR = "features"
OUTPUT_TENSOR = "probability"
OUTPUT_COLUMN = "risk_score"
PASSTHROUGH = ["transaction_id"]  # as in the demo DAG
PERF_ANALYZER_VERSION = "2.51.0"  # the server's version (nvidia-pytriton 0.7.0 carries Triton 2.51.0)
# perf_analyzer needs these two; the server environment carries them under hashed names.
PERF_ANALYZER_LIBS = {"libb64.so.0d": "libb64*.so.0d*", "libcudart.so.12": "libcudart*.so.12*"}

sys.path.insert(0, str(REPO / "dags"))


# ---------------------------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    """Progress line on stderr (stdout carries the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_home() -> Path:
    from airflow_batch_infer.paths import batch_infer_home

    return batch_infer_home()


@dataclass
class ChildResult:
    """A finished child process: its exit code, wall time and its own CPU time (not its children's).

    (Its ``ru_maxrss`` is not kept: Linux carries the parent's high-water mark across a vfork + exec.)
    """

    returncode: int
    wall_s: float
    cpu_s: float
    output: str


def run_child(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> ChildResult:
    """Run ``cmd`` and read its rusage with ``wait4`` (CPU and RSS high-water of that process only).

    :param cmd: the command.
    :param timeout: seconds before the child is killed (the result then has returncode -9).
    :param env: its environment.
    """
    log_path = bench_home() / "bench-data" / f".child-{os.getpid()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log_path, "w+b") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() - started > timeout:
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.02)
        except BaseException:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                proc.kill()
                os.wait4(proc.pid, 0)
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    log_path.unlink(missing_ok=True)
    return ChildResult(
        returncode=proc.returncode,
        wall_s=time.monotonic() - started,
        cpu_s=usage.ru_utime + usage.ru_stime,
        output=text,
    )


def last_json(text: str) -> dict[str, Any]:
    """The last line of ``text`` that is a JSON object."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"No JSON result in the worker's output:\n{text[-3000:]}")


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (``VmHWM``; unlike ``ru_maxrss``, not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("No VmHWM in /proc/self/status.")


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------- data


def chunk_for(rows: int) -> Path:
    """A staged chunk of ``rows`` demo transactions (one chunk file), cached under ``bench-data``."""
    from transactions_data import write_transactions

    from airflow_batch_infer.staging import stage_parquet

    root = bench_home() / "bench-data" / f"rows-{rows}"
    chunk = root / "run" / "chunks" / "chunk-00000.parquet"
    marker = root / "ready"
    if marker.exists() and chunk.exists():
        return chunk
    started = time.monotonic()
    shutil.rmtree(root, ignore_errors=True)
    write_transactions(root / "source", rows)
    manifest = stage_parquet(root / "source", root / "run", chunk_rows=rows, snapshot="copy")
    if len(manifest.chunks) != 1 or Path(manifest.chunks[0].path) != chunk:
        raise RuntimeError(f"Expected one chunk of {rows} rows, got {[c.rows for c in manifest.chunks]}.")
    shutil.rmtree(root / "source")
    marker.write_text(f"{rows}\n")
    log(f"generated a {rows:,}-row chunk in {time.monotonic() - started:.1f} s: {chunk}")
    return chunk


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
class PaRun:
    """One perf_analyzer measurement: best stable rows/s it reported, and its process's CPU."""

    model: str
    batch: int
    concurrency: int
    rows_per_s: float
    cpu_s: float
    rows_served: int
    wall_s: float


@dataclass
class Bench:
    """A started server and what the measurements share."""

    grpc_url: str
    work: Path
    pa_binary: Path
    pa_env: dict[str, str]
    quick: bool
    report: dict[str, Any] = field(default_factory=dict)

    def stats(self, model: str) -> tuple[int, int]:
        """The server's ``(inference_count, execution_count)`` for ``model`` (rows, executions)."""
        from airflow_batch_infer.hooks.triton import TritonHook

        stats = TritonHook(url=self.grpc_url).get_inference_statistics(model)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    # ------------------------------------------------------------------------------------ perf_analyzer

    def perf_analyzer(self, model: str, batch: int, concurrency: int) -> PaRun | None:
        """Run perf_analyzer once; ``None`` when it gives no measurement even with a loose stability test."""
        csv_path = self.work / f"pa-{model}-{batch}-{concurrency}.csv"
        window_ms = 500 if self.quick else 1000
        for stability in (30, 100):
            csv_path.unlink(missing_ok=True)
            cmd = [
                str(self.pa_binary),
                *("-m", model, "-u", self.grpc_url, "-i", "grpc", "-b", str(batch)),
                *("--input-data", "random", "--concurrency-range", str(concurrency)),
                *("-p", str(window_ms), "-r", "5", "-s", str(stability), "-f", str(csv_path)),
            ]
            rows_before = self.stats(model)[0]
            child = run_child(cmd, timeout=60, env=self.pa_env)
            rows_served = self.stats(model)[0] - rows_before
            if child.returncode == 0 and csv_path.exists():
                with open(csv_path) as f:
                    row = next(csv.DictReader(f))
                # perf_analyzer's "Inferences/Second" already counts rows (requests × batch size): in its
                # stdout, request count × batch / window length gives the same figure.
                return PaRun(
                    model, batch, concurrency, float(row["Inferences/Second"]), child.cpu_s, rows_served,
                    child.wall_s,
                )  # fmt: skip
            log(f"perf_analyzer -b {batch} concurrency {concurrency}: no stable measurement (-s {stability})")
        log(child.output[-2000:])
        return None

    def sweep(self, model: str, batches: Sequence[int], concurrencies: Sequence[int]) -> list[PaRun]:
        runs = []
        for batch in batches:
            for concurrency in concurrencies:
                run = self.perf_analyzer(model, batch, concurrency)
                if run is not None:
                    runs.append(run)
                    log(
                        f"perf_analyzer {model} -b {batch} c {concurrency}: {run.rows_per_s:,.0f} rows/s, "
                        f"{run.cpu_s:.2f} s CPU for {run.rows_served:,} rows"
                    )
        if not runs:
            raise RuntimeError(f"perf_analyzer gave no measurement for {model}.")
        return runs

    # ------------------------------------------------------------------------------------ workers

    def worker(self, kind: str, chunk: Path, model: str, *extra: str) -> dict[str, Any]:
        """Run a worker in a fresh subprocess; its JSON result plus its process's CPU and RSS high-water."""
        out_dir = self.work / f"{kind}-{model}-{chunk.parent.parent.parent.name}"
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), kind, "--chunk", str(chunk)]
        cmd += ["--url", self.grpc_url, "--model", model, "--out-dir", str(out_dir), *extra]
        before = self.stats(model)
        child = run_child(cmd, timeout=400)
        after = self.stats(model)
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


def ensure_perf_analyzer(home: Path) -> tuple[Path, dict[str, str]]:
    """Install perf_analyzer (tritonclient 2.51.0 wheel) into a venv of its own; return it and its env.

    Idempotent. Its two missing libraries are linked, under the names it asks for, from the server
    environment's ``nvidia_pytriton.libs``.
    """
    from airflow_batch_infer.runtimes.local import LocalTritonRuntime

    venv = home / "perf-analyzer-env"
    binary = venv / "bin" / "perf_analyzer"
    marker = venv / ".installed"
    if not (binary.exists() and marker.exists() and marker.read_text().strip() == PERF_ANALYZER_VERSION):
        log(f"installing perf_analyzer (tritonclient=={PERF_ANALYZER_VERSION}) into {venv}")
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "--no-deps", f"tritonclient=={PERF_ANALYZER_VERSION}"], check=True)
        if not binary.exists():
            raise RuntimeError(f"tritonclient=={PERF_ANALYZER_VERSION} installed no {binary}.")
        marker.write_text(PERF_ANALYZER_VERSION + "\n")
    libs_src = LocalTritonRuntime().ensure_server_env().site_packages / "nvidia_pytriton.libs"
    libs = venv / "pa-libs"
    libs.mkdir(exist_ok=True)
    for name, pattern in PERF_ANALYZER_LIBS.items():
        found = sorted(libs_src.glob(pattern))
        if not found:
            raise RuntimeError(f"No {pattern} in {libs_src}: perf_analyzer needs {name}.")
        link = libs / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
    check = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=env, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"perf_analyzer does not run: {check.stdout}{check.stderr}")
    return binary, env


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda r: r["rows_per_s"])


def drive(args: argparse.Namespace) -> None:
    """Start the server, run every measurement, print the figures and the ratio lines."""
    from airflow_batch_infer.client.sizing import resolve_sizes
    from airflow_batch_infer.hooks.triton import TritonHook
    from airflow_batch_infer.runtimes.local import LocalTritonRuntime

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
    runtime = LocalTritonRuntime(work_root=home / "servers", restricted_api=False)
    info = runtime.start(str(MODEL_REPOSITORY), [MODEL, HEAVY_MODEL])
    log(f"server ready at {info.grpc_url} ({time.monotonic() - wall_started:.1f} s since start)")
    try:
        bench = Bench(info.grpc_url, work, pa_binary, pa_env, quick)
        hook = TritonHook(url=info.grpc_url)
        sizes = {m: resolve_sizes(hook.get_model_config(m), None, None) for m in (MODEL, HEAVY_MODEL)}
        hook.close()
        log(f"default sizes (request rows, in flight): {sizes}")
        report = run_all(
            bench, args, chunk, chunks_rss, sizes, batches, concurrencies, repeats, naive256_rows
        )
    finally:
        runtime.stop(info)
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
    pa_runs = bench.sweep(MODEL, pa_batches, pa_conc)
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
        heavy_runs = bench.sweep(
            HEAVY_MODEL, sorted({*batches, heavy_rows}), sorted({*concurrencies, heavy_in_flight})
        )
        report["heavy_pa_best"] = max(heavy_runs, key=lambda r: r.rows_per_s)
        heavy_chunk = chunk_for(args.heavy_rows) if args.heavy_rows else chunk
        report["heavy_ours"] = best([bench.worker("ours", heavy_chunk, HEAVY_MODEL) for _ in range(repeats)])
        log(f"ours {HEAVY_MODEL}: {report['heavy_ours']['rows_per_s']:,.0f} rows/s")
    return report


def chunk_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` with two decimals; ``nan`` when either is missing."""
    return f"{a / b:.2f}" if a is not None and b else "nan"


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
