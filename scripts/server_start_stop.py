"""Time the local runtime's start (until the server and its models are ready) and stop, on a warm worker.

    .venv/bin/python scripts/server_start_stop.py [--rounds 5] [--model risk_scorer]

The server environment must exist (``make setup``). Each stop runs from a fresh runtime object with a JSON
round trip of the handle, as a teardown task on another process would. ``tritonclient.grpc`` is imported
first, as a DAG that uses ``batch_inference`` has it imported at parse time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import tritonclient.grpc  # noqa: F401 - imported at DAG parse time in a real start task

from airflow_batch_infer.runtimes import ServerInfo, get_runtime

REPO = Path(__file__).resolve().parent.parent / "triton_models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="risk_scorer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="abi-start-stop-") as work:
        runtime = get_runtime("local", work_root=work)
        runtime.ensure_server_env()
        ready, stop = [], []
        for i in range(args.rounds):
            started = time.monotonic()
            info = runtime.start(str(REPO), [args.model])
            ready.append(time.monotonic() - started)
            other = get_runtime("local", work_root=work)
            started = time.monotonic()
            other.stop(ServerInfo.from_dict(json.loads(json.dumps(info.to_dict()))))
            stop.append(time.monotonic() - started)
            print(f"round {i}: ready {ready[-1]:.2f} s, stop {stop[-1]:.2f} s", flush=True)
    print(f"median: ready {statistics.median(ready):.2f} s, stop {statistics.median(stop):.2f} s")


if __name__ == "__main__":
    main()
