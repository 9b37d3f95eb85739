"""The ceiling: Triton's own ``perf_analyzer`` (from the ``tritonclient==2.51.0`` wheel, the server's
version), installed into a virtual environment of its own and run over a small sweep of request sizes
and concurrencies."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench_support import log, model_counts, run_child

PERF_ANALYZER_VERSION = "2.51.0"  # the server's version (nvidia-pytriton 0.7.0 carries Triton 2.51.0)
# perf_analyzer needs these two; the server environment carries them under hashed names.
PERF_ANALYZER_LIBS = {"libb64.so.0d": "libb64*.so.0d*", "libcudart.so.12": "libcudart*.so.12*"}


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


@dataclass
class PerfAnalyzer:
    """perf_analyzer against one server.

    :param binary: the installed ``perf_analyzer`` (:func:`ensure_perf_analyzer`).
    :param env: its environment.
    :param grpc_url: the server.
    :param work: where its CSV reports go.
    :param window_ms: its measurement window.
    """

    binary: Path
    env: dict[str, str]
    grpc_url: str
    work: Path
    window_ms: int = 1000

    def run(self, model: str, batch: int, concurrency: int) -> PaRun | None:
        """Run perf_analyzer once; ``None`` when it gives no measurement even with a loose stability test."""
        csv_path = self.work / f"pa-{model}-{batch}-{concurrency}.csv"
        for stability in (30, 100):
            csv_path.unlink(missing_ok=True)
            cmd = [
                str(self.binary),
                *("-m", model, "-u", self.grpc_url, "-i", "grpc", "-b", str(batch)),
                *("--input-data", "random", "--concurrency-range", str(concurrency)),
                *("-p", str(self.window_ms), "-r", "5", "-s", str(stability), "-f", str(csv_path)),
            ]
            rows_before = model_counts(self.grpc_url, model)[0]
            child = run_child(cmd, timeout=60, env=self.env)
            rows_served = model_counts(self.grpc_url, model)[0] - rows_before
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
        """:meth:`run` at every request size and concurrency; the measurements it gave."""
        runs = []
        for batch in batches:
            for concurrency in concurrencies:
                run = self.run(model, batch, concurrency)
                if run is not None:
                    runs.append(run)
                    log(
                        f"perf_analyzer {model} -b {batch} c {concurrency}: {run.rows_per_s:,.0f} rows/s, "
                        f"{run.cpu_s:.2f} s CPU for {run.rows_served:,} rows"
                    )
        if not runs:
            raise RuntimeError(f"perf_analyzer gave no measurement for {model}.")
        return runs
