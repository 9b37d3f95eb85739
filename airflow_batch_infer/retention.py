"""Staging retention: which run folders to remove once their runs are long over.

A run folder (``<staging_root>/<dag_id>/<partition>/<run>``) holds the run's manifest, output and rejects
parts, and, once persist committed them, ``summary.json``. Kept for ``retention`` (7 days by default), it
lets a failed run be inspected and a persist be retried; after that it only takes space. A folder goes
when it is older than ``retention`` and its run is no longer queued or running (finished, failed, or
unknown to Airflow), except the latest committed run of each partition, whose parts are what the table
holds (the ``s3_parquet`` and ``athena`` tables are the parts). A folder without a manifest (a stage that
died) goes once it is older than ``retention`` too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from airflow_batch_infer import storage
from airflow_batch_infer.staging import MANIFEST, SUMMARY, run_file

#: DAG run states in which a run's folder is still in use.
ACTIVE_RUN_STATES = ("queued", "running")
DEFAULT_RETENTION_DAYS = 7.0


@dataclass(frozen=True)
class RunFolder:
    """A run folder as found on the store.

    :param path: the folder (a local path or a location string).
    :param dag_id: its run's DAG (``""`` when the manifest does not say: none, or staged outside a run).
    :param run_id: its run (``""`` likewise).
    :param created: when its snapshot was taken (epoch seconds; the folder's modification time without one).
    :param committed: whether persist committed it (``summary.json`` is there).
    :param has_manifest: whether its snapshot completed (``manifest.json`` is there).
    """

    path: str
    dag_id: str
    run_id: str
    created: float
    committed: bool
    has_manifest: bool = True


def run_folders(staging_root: str) -> list[list[RunFolder]]:
    """Every run folder under ``staging_root``, grouped by partition (``<dag_id>/<partition>``).

    :param staging_root: a local folder or an object store location.
    """
    groups = []
    for dag_folder in storage.list_folders(staging_root):
        for partition_folder in storage.list_folders(dag_folder):
            groups.append([_read(folder) for folder in storage.list_folders(partition_folder)])
    return groups


def expired_folders(
    groups: list[list[RunFolder]],
    run_state: Callable[[str, str], str | None],
    *,
    now: float,
    retention: float,
) -> list[tuple[RunFolder, str]]:
    """The run folders to remove, each with the reason: a pure function of the folders and Airflow's word.

    :param groups: run folders by partition (:func:`run_folders`).
    :param run_state: ``(dag_id, run_id) -> state`` (``None`` when Airflow does not know the run).
    :param now: epoch seconds.
    :param retention: seconds a run folder is kept.
    """
    expired = []
    for group in groups:
        committed = [f for f in group if f.committed]
        latest = max(committed, key=lambda f: f.created) if committed else None
        for folder in group:
            age = now - folder.created
            if age < retention or folder is latest:
                continue
            days = f"{age / 86400:.1f} days old (retention {retention / 86400:g} days)"
            if not folder.has_manifest:
                expired.append((folder, f"{days}, and holds no manifest (its stage never completed)"))
                continue
            state = run_state(folder.dag_id, folder.run_id) if folder.run_id else None
            if state in ACTIVE_RUN_STATES:
                continue
            kept = "a later committed run replaced it" if folder.committed else "never committed"
            expired.append((folder, f"{days}, its run is {state or 'unknown to Airflow'}, {kept}"))
    return expired


def _read(folder: str) -> RunFolder:
    manifest_path = run_file(folder, MANIFEST)
    committed = storage.exists(run_file(folder, SUMMARY))
    if storage.exists(manifest_path):
        manifest = json.loads(storage.read_text(manifest_path))
        created = datetime.fromisoformat(manifest["created_at"]).timestamp()
        return RunFolder(folder, manifest.get("dag_id", ""), manifest.get("run_id", ""), created, committed)
    return RunFolder(folder, "", "", _modified(folder), committed, has_manifest=False)


def _modified(folder: str) -> float:
    if not storage.is_remote(folder):
        return Path(folder).stat().st_mtime
    fs, fs_path = storage.filesystem(folder)
    times = [info.get("LastModified") or info.get("mtime") for info in fs.find(fs_path, detail=True).values()]
    stamps = [t.timestamp() if hasattr(t, "timestamp") else float(t) for t in times if t]
    return max(stamps, default=0.0)
