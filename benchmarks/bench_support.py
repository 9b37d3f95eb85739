"""What the benchmark scripts share: progress lines, child processes measured by their own rusage, this
process's CPU and peak RSS, staged demo chunks, a local Triton server and its counters, ratio lines.

Imported by name from the scripts beside it (``python benchmarks/<script>.py`` puts this folder first on
``sys.path``); the package is imported inside the functions, so that a script can choose which tree's
package it measures before it imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO / "triton_models"

if str(REPO / "dags") not in sys.path:
    sys.path.insert(0, str(REPO / "dags"))  # transactions_data: the demo's input generator


def log(message: str) -> None:
    """Progress line on stderr (stdout carries the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` with two decimals; ``nan`` when either is missing."""
    return f"{a / b:.2f}" if a is not None and b else "nan"


def bench_home() -> Path:
    """``$BATCH_INFER_HOME``: where the benchmarks keep their data and servers."""
    from airflow_batch_infer.paths import batch_infer_home

    return batch_infer_home()


# ---------------------------------------------------------------------------------------------- processes


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
    """This process's user and system CPU seconds so far."""
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


def chunk_rows(path: Path) -> int:
    """Rows of a Parquet file, from its footer."""
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


# ---------------------------------------------------------------------------------------------- server


@contextlib.contextmanager
def local_server(models: Sequence[str], work_root: Path, restricted_api: bool = False) -> Iterator[Any]:
    """A local Triton server of this repository's ``models``, stopped on the way out; yields its
    ``ServerInfo``.

    :param models: models to load.
    :param work_root: where the server's files go.
    :param restricted_api: give the server a restricted-API key; without one, a measuring tool or a worker
        given only the address uses its shared memory as it would a server of its own (the key costs
        nothing per request; the infer task sends it).
    """
    from airflow_batch_infer.runtimes.local import LocalTritonRuntime

    runtime = LocalTritonRuntime(work_root=work_root, restricted_api=restricted_api)
    info = runtime.start(str(MODEL_REPOSITORY), list(models))
    try:
        yield info
    finally:
        runtime.stop(info)


def model_counts(grpc_url: str, model: str) -> tuple[int, int]:
    """The server's ``(inference_count, execution_count)`` for ``model`` (rows, executions)."""
    from airflow_batch_infer.hooks.triton import TritonHook

    stats = TritonHook(url=grpc_url).get_inference_statistics(model)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))
