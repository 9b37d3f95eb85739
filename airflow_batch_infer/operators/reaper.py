"""TritonServerReaperOperator: stop the Triton servers whose DAG run has ended (orphans)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_batch_infer.runtimes import ServerInfo, ServerOwner, get_runtime

#: DAG run states in which a run's server is still wanted.
ACTIVE_RUN_STATES = ("queued", "running")


def select_orphans(
    servers: list[ServerInfo],
    run_is_active: Callable[[str, str], bool],
    *,
    now: float,
    min_age: float,
    stop_unowned: bool = False,
) -> list[tuple[ServerInfo, str]]:
    """The servers to stop, each with the reason: a pure function of what the runtime and Airflow say.

    A server is an orphan when its DAG run is no longer queued or running (it succeeded, failed, or was
    deleted). Servers younger than ``min_age`` are always spared (a start task may be writing its
    handle), and so are servers without an owner unless ``stop_unowned``.

    :param servers: what the runtime's ``list_servers()`` returned.
    :param run_is_active: ``(dag_id, run_id) -> bool``.
    :param now: epoch seconds.
    :param min_age: seconds a server must have existed to be stopped.
    :param stop_unowned: also stop servers that name no DAG run.
    """
    orphans = []
    for info in servers:
        started = float(info.handle.get("started_at") or 0)
        if started and now - started < min_age:
            continue
        owner = ServerOwner.from_dict(info.handle.get("owner"))
        if owner is None:
            if stop_unowned:
                orphans.append((info, "it names no DAG run"))
            continue
        if not run_is_active(owner.dag_id, owner.run_id):
            orphans.append((info, f"DAG run {owner.dag_id} / {owner.run_id} is no longer queued or running"))
    return orphans


class TritonServerReaperOperator(BaseOperator):
    """Stop the servers of one runtime whose DAG run has ended without stopping them.

    The teardown task normally stops a run's server; this is the safety net for what escapes it (a worker
    lost mid-start, a deferred start that Airflow timed out, a run marked failed by hand). It lists the
    servers the runtime started (docker containers and Kubernetes Pods by label, ECS tasks by
    ``startedBy``, local processes by their folders under ``work_root``) and asks Airflow, through the task
    SDK (``ti.get_dr_count``, no database access from the task), whether each one's DAG run is still queued
    or running.

    :param runtime: ``local``, ``docker``, ``kubernetes`` or ``ecs``.
    :param runtime_options: the options the DAGs give that runtime (Docker host, namespace, cluster, ...).
    :param min_age: seconds a server must have existed before it may be stopped.
    :param stop_unowned: also stop servers that name no DAG run (started outside Airflow).
    :param dry_run: only log what would be stopped.
    """

    template_fields: Sequence[str] = ("runtime", "runtime_options")
    ui_color = "#76b900"

    def __init__(
        self,
        *,
        runtime: str = "local",
        runtime_options: dict[str, Any] | None = None,
        min_age: float = 600,
        stop_unowned: bool = False,
        dry_run: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.runtime = runtime
        self.runtime_options = runtime_options or {}
        self.min_age = min_age
        self.stop_unowned = stop_unowned
        self.dry_run = dry_run

    def execute(self, context: Any) -> list[dict[str, Any]]:
        runtime = get_runtime(self.runtime, **self.runtime_options)
        ti = context["ti"]
        states: dict[tuple[str, str], bool] = {}

        def run_is_active(dag_id: str, run_id: str) -> bool:
            if (dag_id, run_id) not in states:
                count = ti.get_dr_count(dag_id=dag_id, run_ids=[run_id], states=list(ACTIVE_RUN_STATES))
                states[(dag_id, run_id)] = count > 0
            return states[(dag_id, run_id)]

        servers = runtime.list_servers()
        orphans = select_orphans(
            servers, run_is_active, now=time.time(), min_age=self.min_age, stop_unowned=self.stop_unowned
        )
        self.log.info("%d %s server(s) found, %d orphaned.", len(servers), self.runtime, len(orphans))
        reaped = []
        for info, reason in orphans:
            server_id = info.handle.get("server_id")
            if self.dry_run:
                self.log.info("Would stop Triton server %s: %s (dry run).", server_id, reason)
                stopped = False
            else:
                stopped = runtime.stop(info)
                self.log.info(
                    "Triton server %s: %s; %s.",
                    server_id,
                    reason,
                    "stopped" if stopped else "already gone, cleaned up",
                )
            reaped.append(
                {
                    "server_id": server_id,
                    "owner": info.handle.get("owner"),
                    "reason": reason,
                    "stopped": stopped,
                }
            )
        return reaped
