"""The inference task's code path of this tree against a git revision's, side by side on one server.

Checks the revision out into a temporary git worktree, stages a chunk with each tree's own staging code
(each under its own ``BATCH_INFER_HOME``), starts one local Triton server, then alternates fresh
``throughput.py ours`` workers of the two trees and prints the median rows/s and client CPU per million
rows of each, and their ratios. Usage::

    python benchmarks/against_revision.py REV [--rows N] [--pairs K]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_support import local_server

REPO = Path(__file__).resolve().parents[1]
MODEL = "risk_scorer"


def tree_env(tree: Path, home: Path) -> dict[str, str]:
    """The environment that makes ``tree``'s package the one imported, with its own data folder."""
    return {**os.environ, "PYTHONPATH": str(tree), "BATCH_INFER_HOME": str(home)}


def staged_chunk(tree: Path, home: Path, rows: int) -> Path:
    """A chunk of ``rows`` demo rows staged by ``tree``'s own code (cached under ``home``)."""
    code = f"import throughput; print(throughput.chunk_for({rows}))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree / "benchmarks",
        env=tree_env(tree, home),
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def run_worker(tree: Path, home: Path, chunk: Path, url: str, out_dir: Path) -> dict[str, float]:
    """One fresh ``ours`` worker of ``tree``: its JSON result."""
    cmd = [sys.executable, str(tree / "benchmarks" / "throughput.py"), "ours", "--chunk", str(chunk)]
    cmd += ["--url", url, "--model", MODEL, "--out-dir", str(out_dir)]
    out = subprocess.run(cmd, cwd=tree, env=tree_env(tree, home), capture_output=True, text=True, check=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="git revision to compare against (a commit, a tag, HEAD~1)")
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the chunk")
    parser.add_argument("--pairs", type=int, default=6, help="runs of each tree, alternating")
    args = parser.parse_args(argv)

    from airflow_batch_infer.paths import batch_infer_home

    work = Path(tempfile.mkdtemp(prefix="abi-against-"))
    other = work / "tree"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(other), args.revision], check=True
    )
    try:
        trees = {args.revision: (other, work / "home"), "this tree": (REPO, batch_infer_home())}
        chunks = {name: staged_chunk(tree, home, args.rows) for name, (tree, home) in trees.items()}
        for name, chunk in chunks.items():
            print(f"{name}: chunk {chunk} ({chunk.stat().st_size:,} bytes)", file=sys.stderr)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        with local_server([MODEL], work / "servers") as info:  # no restricted-API key: the workers get none
            for _ in range(args.pairs):
                for name, (tree, home) in trees.items():
                    result = run_worker(tree, home, chunks[name], info.grpc_url, work / "out")
                    results[name].append(result)
                    print(f"{name}: {result['rows_per_s']:,.0f} rows/s", file=sys.stderr)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(other)], check=False)
        shutil.rmtree(work, ignore_errors=True)

    medians = {}
    for name, runs in results.items():
        rows_per_s = statistics.median(r["rows_per_s"] for r in runs)
        cpu = statistics.median(r["cpu_run_s"] / r["rows"] * 1e6 for r in runs)
        medians[name] = (rows_per_s, cpu)
        print(f"{name}: median {rows_per_s / 1e6:.2f} M rows/s, client CPU {cpu:.3f} s per million rows")
    (base_rate, base_cpu), (rate, cpu) = medians[args.revision], medians["this tree"]
    print(f"rows_per_s this/{args.revision}={rate / base_rate:.2f}")
    print(f"cpu_per_row this/{args.revision}={cpu / base_cpu:.2f}")


if __name__ == "__main__":
    main()
