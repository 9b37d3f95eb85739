"""Maintenance: stop the Triton servers that no run keeps any more (orphans), and remove old run folders.

Each run's teardown task stops its server, and a local server's supervisor stops it when its lease runs
out; this DAG is the safety net for what escapes both (a worker lost while the server started, a hung
keeper, a run marked failed by hand, a Pod or ECS task whose run stopped renewing its lease). For each
runtime in use it finds the servers this package started from the host and the platform (processes and
server folders, labels, tags), and stops those whose lease expired, whose keeper is gone, or whose DAG run
is no longer queued or running (once they are older than ``min_age``).

The runtimes and their options (the same as the DAGs give them) come from the environment variable
``BATCH_INFER_REAPED_RUNTIMES``, a JSON object, e.g.
``{"local": {}, "docker": {"network": "airflow-batch-infer"}, "kubernetes": {"namespace": "ml"},
"ecs": {"cluster": "gpu"}}``; only the local runtime by default.

It also removes run folders (manifest, output and rejects parts) older than ``[batch_infer]
staging_retention_days`` (7 by default; also ``BATCH_INFER_STAGING_RETENTION_DAYS``) whose runs are over,
keeping the latest committed run of each partition, under each staging root of
``BATCH_INFER_STAGING_ROOTS`` (a JSON list of roots, URLs as ``s3://conn_id@bucket/prefix``;
``$BATCH_INFER_HOME/staging`` by default).
"""

from __future__ import annotations

import json
import os

import pendulum
from airflow.sdk import DAG

from airflow_batch_infer.operators.reaper import TritonServerReaperOperator
from airflow_batch_infer.operators.retention import StagingRetentionOperator

#: Runtime name → its options, as the DAGs give them.
REAPED_RUNTIMES: dict[str, dict] = json.loads(os.environ.get("BATCH_INFER_REAPED_RUNTIMES") or "{}")
REAPED_RUNTIMES = REAPED_RUNTIMES or {"local": {}}
STAGING_ROOTS: list[str | None] = json.loads(os.environ.get("BATCH_INFER_STAGING_ROOTS") or "null") or [None]

with DAG(
    dag_id="triton_reaper",
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["maintenance", "triton"],
    doc_md=__doc__,
):
    for runtime, options in REAPED_RUNTIMES.items():
        TritonServerReaperOperator(
            task_id=f"reap_{runtime}",
            runtime=runtime,
            runtime_options=options,
            min_age=900,
        )
    for number, root in enumerate(STAGING_ROOTS):
        # retention_days: [batch_infer] staging_retention_days, read when the task runs.
        StagingRetentionOperator(task_id=f"remove_old_run_folders_{number}", staging_root=root)
