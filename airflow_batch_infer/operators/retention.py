"""StagingRetentionOperator: remove run folders whose runs are long over (see ``retention``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_batch_infer import storage
from airflow_batch_infer.config import get_float
from airflow_batch_infer.operators.reaper import run_states
from airflow_batch_infer.paths import batch_infer_home
from airflow_batch_infer.retention import expired_folders, run_folders
from airflow_batch_infer.slot_release import release_slot_at_exit


class StagingRetentionOperator(BaseOperator):
    """Remove the run folders of a staging root that are older than ``retention_days`` and whose runs are
    no longer queued or running, keeping the latest committed run of each partition.

    It asks Airflow, through the task SDK, only for each folder's run state (from its manifest). It returns
    (and logs) each folder it removed, or would remove with ``dry_run``, with the reason.

    :param staging_root: the root of run folders (default ``$BATCH_INFER_HOME/staging``); may be a URL.
    :param staging_conn_id: Airflow connection for a ``staging_root`` on object storage.
    :param retention_days: how long a run folder is kept (default ``[batch_infer] staging_retention_days``).
    :param dry_run: only log what would be removed.
    """

    template_fields: Sequence[str] = ("staging_root", "staging_conn_id", "retention_days")
    ui_color = "#76b900"

    def __init__(
        self,
        *,
        staging_root: str | None = None,
        staging_conn_id: str | None = None,
        retention_days: float | str | None = None,
        dry_run: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.staging_root = staging_root
        self.staging_conn_id = staging_conn_id
        self.retention_days = retention_days
        self.dry_run = dry_run

    def execute(self, context: Any) -> list[dict[str, Any]]:
        release_slot_at_exit()
        root = storage.location(
            self.staging_root or batch_infer_home() / "staging", self.staging_conn_id or None
        )
        run_state = run_states(context["ti"])

        days = (
            get_float("staging_retention_days") if self.retention_days in (None, "") else self.retention_days
        )
        groups = run_folders(root)
        expired = expired_folders(groups, run_state, now=time.time(), retention=float(days) * 86400)
        self.log.info(
            "%d run folder(s) under %s, %d to remove.", sum(len(g) for g in groups), root, len(expired)
        )
        removed = []
        for folder, reason in expired:
            if not self.dry_run:
                storage.remove(folder.path)
            self.log.info("%s %s: %s.", "Would remove" if self.dry_run else "Removed", folder.path, reason)
            removed.append({"path": folder.path, "run_id": folder.run_id, "reason": reason})
        return removed
