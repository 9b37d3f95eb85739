"""The demo: run the ETL DAG, then the batch inference DAG on its output, and print what was written.

Both DAGs run through Airflow itself (``airflow dags test``), on the embedded defaults: a local
``tritonserver`` process, local files under ``$BATCH_INFER_HOME`` and a DuckDB warehouse.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from airflow_batch_infer.paths import batch_infer_home

LOGICAL_DATE = os.environ.get("BATCH_INFER_DEMO_DATE", "2026-11-21")
BIN = Path(sys.executable).parent


def run_dag(dag_id: str, log: Path, conf: dict | None = None) -> float:
    """Run one DAG with ``airflow dags test``; its output goes to ``log``. Returns the seconds taken."""
    command = [str(BIN / "airflow"), "dags", "test", dag_id, LOGICAL_DATE]
    if conf:
        command += ["-c", json.dumps(conf)]
    print(f"$ {' '.join(command)}   (log: {log})", flush=True)
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        print(log.read_text()[-6000:])
        sys.exit(f"{dag_id} failed (exit {done.returncode}); the end of its log is above.")
    return seconds


def main() -> None:
    home = batch_infer_home()
    logs = home / "demo-logs"
    logs.mkdir(parents=True, exist_ok=True)
    etl_seconds = run_dag("etl_transactions", logs / "etl_transactions.log")
    print(f"ETL wrote the transactions in {etl_seconds:.1f} s")
    demo_seconds = run_dag("batch_inference_demo", logs / "batch_inference_demo.log")

    summaries = sorted(
        (home / "staging" / "batch_inference_demo" / LOGICAL_DATE).glob("*/summary.json"),
        key=lambda p: p.stat().st_mtime,
    )
    if not summaries:
        sys.exit("The run finished but wrote no summary.json: see the log above.")
    summary = json.loads(summaries[-1].read_text())
    with duckdb.connect(summary["location"], read_only=True) as con:
        rows = con.execute(
            f'SELECT count(*), count(DISTINCT row_id) FROM "{summary["table"]}" WHERE batch_partition = ?',
            [summary["partition"]],
        ).fetchone()
    print()
    print(f"rows scored:      {rows[0]:,} ({rows[1]:,} distinct row ids) of {summary['total_rows']:,} staged")
    print(f"rows set aside:   {summary['rejected']:,} (table {summary['rejects_table']})")
    print(f"throughput:       {summary['infer_rows_per_second_per_task']:,.0f} rows/s per infer task")
    print(f"chunks:           {summary['chunks']} mapped infer tasks")
    print(f"table:            {summary['table']} (partition {summary['partition']}) in {summary['location']}")
    print(f"whole DAG run:    {demo_seconds:.1f} s with Airflow start-up and the server's start and stop")
    if rows[0] + summary["rejected"] != summary["total_rows"] or rows[0] != rows[1]:
        sys.exit("Row counts do not add up: see the logs above.")


if __name__ == "__main__":
    main()
