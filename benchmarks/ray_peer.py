"""The Ray Data peer of ``benchmarks/e2e.py``: score Parquet files on the same Triton server with Ray Data.

Runs inside the venv that ``benchmarks/ray_env.py`` builds (``ray[data]`` and ``tritonclient[grpc]``). It does
what a Ray user would: ``read_parquet`` → ``map_batches`` with a fixed pool of actors, each holding one
gRPC ``InferenceServerClient`` and calling synchronous ``infer`` once per batch → ``write_parquet``.

Two knobs for a small machine:

* ``--footer-actors`` (default 2): Ray 2.60 lists Parquet footers with 32 short-lived actors
  (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``), 32 worker processes to start on a 2-core machine.
* ``--rows-per-block`` (default 0: Ray's own blocks): Ray 2.60 reads Parquet (datasource V2) in bins of up
  to 128 MiB and ignores ``override_num_blocks``, so an input under 128 MiB is one block and one actor sends
  every request; a streaming ``repartition(target_num_rows_per_block=...)`` spreads the blocks over the
  actor pool (at the price of one write task and one output file per block).

Prints exactly one JSON line on stdout at the end (everything else goes to stderr)::

    {"rows": ..., "distinct_ids": ..., "init_s": ..., "read_to_write_s": ..., "shutdown_s": ...,
     "total_s": ..., "sample": [[transaction_id, risk_score], ...]}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

FEATURES = [f"f{i:02d}" for i in range(16)]
ID_COLUMN = "transaction_id"
SCORE_COLUMN = "risk_score"


class TritonScorer:
    """A Ray Data actor: one gRPC client to Triton, one synchronous ``infer`` per batch.

    :param url: ``host:port`` of Triton's gRPC endpoint.
    :param model: model name.
    :param input_tensor: name of the FP32 ``[-1, 16]`` input.
    :param output_tensor: name of the FP32 ``[-1, 1]`` output.
    """

    def __init__(self, url: str, model: str, input_tensor: str, output_tensor: str) -> None:
        import tritonclient.grpc as grpcclient

        self.grpcclient = grpcclient
        self.client = grpcclient.InferenceServerClient(url=url)
        self.model = model
        self.input_tensor = input_tensor
        self.output_tensor = output_tensor
        self.outputs = [grpcclient.InferRequestedOutput(output_tensor)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = np.stack([batch[name] for name in FEATURES], axis=1).astype(np.float32, copy=False)
        request = self.grpcclient.InferInput(self.input_tensor, list(features.shape), "FP32")
        request.set_data_from_numpy(features)
        result = self.client.infer(self.model, inputs=[request], outputs=self.outputs)
        scores = result.as_numpy(self.output_tensor).reshape(-1)
        return {ID_COLUMN: batch[ID_COLUMN], SCORE_COLUMN: scores}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="folder of Parquet files")
    parser.add_argument(
        "--output", required=True, type=Path, help="output folder (replaced when it holds only Parquet files)"
    )
    parser.add_argument("--url", required=True, help="Triton gRPC host:port")
    parser.add_argument("--model", default="risk_scorer")
    parser.add_argument("--input-tensor", default="features")
    parser.add_argument("--output-tensor", default="probability")
    parser.add_argument("--request-rows", type=int, default=32768, help="rows per batch = per request")
    parser.add_argument("--actors", type=int, default=2, help="fixed actor pool size")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="CPUs Ray may use")
    parser.add_argument(
        "--actor-cpus",
        type=float,
        default=None,
        help="CPUs reserved per actor (default: half of --num-cpus shared by the actors, at most 1); "
        "actors * actor-cpus must stay below --num-cpus, or the read and write tasks never get a CPU",
    )
    parser.add_argument(
        "--rows-per-block",
        type=int,
        default=0,
        help="streaming repartition to blocks of at most this many rows (default 0: Ray's own blocks)",
    )
    parser.add_argument(
        "--footer-actors",
        type=int,
        default=2,
        help="actors that read Parquet footers when listing (Ray's default: 32)",
    )
    parser.add_argument("--object-store-bytes", type=int, default=2_000_000_000, help="Ray object store size")
    args = parser.parse_args(argv)
    if args.actor_cpus is None:
        args.actor_cpus = min(1.0, args.num_cpus / (2 * args.actors))
    if args.actors * args.actor_cpus >= args.num_cpus:
        parser.error(
            f"--actors {args.actors} x --actor-cpus {args.actor_cpus} leaves none of --num-cpus "
            f"{args.num_cpus} to the read and write tasks: Ray Data would wait forever"
        )
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start Ray, run the pipeline, stop Ray; return the timings and the output's checks."""
    # Read by Ray and inherited by its workers. No usage reporting (no internet here). Loopback only: Ray
    # replaces a node IP of 127.0.0.1 by the routable one and listens on every interface, unless
    # clusters are "disabled" (as on macOS), which makes the node 127.0.0.1 and binds every port there.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = str(args.footer_actors)
    import ray

    if args.output.exists():
        others = [p.name for p in args.output.iterdir() if p.suffix != ".parquet"]
        if others:
            raise SystemExit(f"--output {args.output} holds files other than Parquet files: {others[:5]}")
        shutil.rmtree(args.output)
    temp_dir = tempfile.mkdtemp(prefix="raypeer-")  # short: Ray's socket paths must stay < 108 bytes
    try:
        started = time.perf_counter()
        ray.init(
            address="local",  # always a new local instance, never one someone else started
            num_cpus=args.num_cpus,
            object_store_memory=args.object_store_bytes,
            include_dashboard=False,
            _temp_dir=temp_dir,
        )
        init_s = time.perf_counter() - started

        begin = time.perf_counter()
        dataset = ray.data.read_parquet(str(args.input)).select_columns([ID_COLUMN, *FEATURES])
        if args.rows_per_block > 0:
            dataset = dataset.repartition(target_num_rows_per_block=args.rows_per_block)
        dataset = dataset.map_batches(
            TritonScorer,
            fn_constructor_kwargs={
                "url": args.url,
                "model": args.model,
                "input_tensor": args.input_tensor,
                "output_tensor": args.output_tensor,
            },
            compute=ray.data.ActorPoolStrategy(size=args.actors),
            batch_size=args.request_rows,
            batch_format="numpy",
            num_cpus=args.actor_cpus,
        )
        dataset.write_parquet(str(args.output))
        read_to_write_s = time.perf_counter() - begin
        stats = dataset.stats()

        stopping = time.perf_counter()
        ray.shutdown()
        finished = time.perf_counter()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    print(stats, file=sys.stderr)

    table = pads.dataset(str(args.output), format="parquet").to_table()
    ids = table.column(ID_COLUMN)
    head = table.take(pc.sort_indices(ids)[:5])
    sample = [
        [int(i), float(s)]
        for i, s in zip(
            head.column(ID_COLUMN).to_pylist(), head.column(SCORE_COLUMN).to_pylist(), strict=True
        )
    ]
    return {
        "rows": table.num_rows,
        "distinct_ids": pc.count_distinct(ids).as_py(),
        "init_s": round(init_s, 3),
        "read_to_write_s": round(read_to_write_s, 3),
        "shutdown_s": round(finished - stopping, 3),
        "total_s": round(finished - started, 3),
        "sample": sample,
    }


def main(argv: list[str] | None = None) -> int:
    """Run with stdout pointed at stderr (Ray and its workers print), then print the one JSON line."""
    args = parse_args(argv)
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    result = run(args)
    sys.stdout.flush()
    json_out.write(json.dumps(result) + "\n")
    json_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
