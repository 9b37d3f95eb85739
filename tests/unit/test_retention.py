"""Staging retention: old folders of finished runs go; running runs and each partition's last commit stay."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_infer.retention import expired_folders, run_folders
from airflow_batch_infer.staging import SUMMARY, run_directory, stage_parquet, write_json_atomically

DAY = 86_400.0
NOW = time.time()


def staged(root: Path, source: Path, run_id: str, partition: str, days_old: float, committed: bool) -> Path:
    """A run folder as a run leaves it: its manifest (dated ``days_old`` ago), a summary when committed."""
    run_dir = run_directory(root, "nightly", partition, run_id)
    manifest = stage_parquet(
        source, run_dir, run={"dag_id": "nightly", "run_id": run_id, "partition": partition}
    )
    data = manifest.to_dict() | {
        "created_at": datetime.fromtimestamp(NOW - days_old * DAY, timezone.utc).isoformat()
    }
    write_json_atomically(Path(run_dir) / "manifest.json", data)
    if committed:
        write_json_atomically(Path(run_dir) / SUMMARY, {"rows": 2})
    return Path(run_dir)


def test_old_folders_of_finished_runs_go_and_each_partitions_latest_commit_stays(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"x": [1.0, 2.0]}), tmp_path / "in" / "a.parquet")
    root = tmp_path / "staging"
    superseded = staged(root, tmp_path / "in", "scheduled__1", "2026-11-01", days_old=30, committed=True)
    latest = staged(root, tmp_path / "in", "scheduled__2", "2026-11-01", days_old=20, committed=True)
    failed = staged(root, tmp_path / "in", "manual__failed", "2026-11-01", days_old=10, committed=False)
    recent = staged(root, tmp_path / "in", "manual__recent", "2026-11-01", days_old=1, committed=False)
    running = staged(root, tmp_path / "in", "backfill__long", "2026-11-02", days_old=9, committed=False)
    broken = root / "nightly" / "2026-11-03" / "manual__died-0000"
    broken.mkdir(parents=True)
    (broken / "chunks").mkdir()
    os.utime(broken, (NOW - 8 * DAY, NOW - 8 * DAY))
    states = {"scheduled__1": "success", "scheduled__2": "success", "manual__failed": "failed"}
    asked = []

    def run_state(dag_id: str, run_id: str) -> str | None:
        asked.append((dag_id, run_id))
        return states.get(run_id, "running" if run_id == "backfill__long" else None)

    groups = run_folders(str(root))
    expired = dict(
        (Path(f.path), reason) for f, reason in expired_folders(groups, run_state, now=NOW, retention=7 * DAY)
    )

    assert sorted(expired) == sorted([superseded, failed, broken])
    assert "its run is success, a later committed run replaced it" in expired[superseded]
    assert "its run is failed, never committed" in expired[failed]
    assert "holds no manifest" in expired[broken]
    for kept in (latest, recent, running):
        assert kept not in expired
    assert ("nightly", "manual__recent") not in asked  # young folders are not even asked about
    assert sum(len(g) for g in groups) == 6
