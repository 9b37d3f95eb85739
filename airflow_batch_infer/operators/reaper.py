"""TritonServerReaperOperator: stop the Triton servers that no run keeps any more (orphans)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_batch_infer.runtimes import ServerInfo, ServerOwner, get_runtime
from airflow_batch_infer.slot_release import release_slot_at_exit

#: DAG run states in which a run's server is still wanted.
ACTIVE_RUN_STATES = ("queued", "running")


def lease_expired(handle: dict[str, Any], now: float) -> str | None:
    """Why the server's lease has run out, or ``None``: from ``lease_age`` (local servers) or from
    ``lease_renewed_at`` (a label, tag or annotation of a container, Pod or ECS task) and ``lease_timeout``.
    """
    timeout = float(handle.get("lease_timeout") or 0)
    if timeout <= 0:
        return None
    age = handle.get("lease_age")
    if age is None and handle.get("lease_renewed_at"):
        age = now - float(handle["lease_renewed_at"])
    if age is None or float(age) <= timeout:
        return None
    return f"its lease expired: not renewed for {float(age):.0f} s (lease_timeout {timeout:g} s)"


def select_orphans(
    servers: list[ServerInfo],
    run_state: Callable[[str, str], str | None],
    *,
    now: float,
    min_age: float,
    stop_unowned: bool = False,
) -> list[tuple[ServerInfo, str]]:
    """The servers to stop, each with the reason: a pure function of what the host, the platform and
    Airflow say.

    A server is stopped when its lease has expired, when it runs without its keeper (a local server whose
    supervisor is gone), or when its DAG run is no longer queued or running (it succeeded, failed, or
    Airflow does not know it). Servers younger than ``min_age`` are spared the last test (a start task may
    be writing its handle), and so are servers without an owner unless ``stop_unowned``.

    :param servers: what the runtime's ``list_servers()`` returned.
    :param run_state: ``(dag_id, run_id) -> state`` (``None`` when Airflow does not know the run).
    :param now: epoch seconds.
    :param min_age: seconds a server must have existed to be stopped for its run's state.
    :param stop_unowned: also stop servers that name no DAG run.
    """
    orphans = []
    for info in servers:
        handle = info.handle
        expired = lease_expired(handle, now)
        if expired:
            orphans.append((info, expired))
            continue
        if handle.get("state") == "running" and handle.get("keeper") == "gone":
            orphans.append((info, "its keeper is gone: the supervisor died and left the server running"))
            continue
        started = float(handle.get("started_at") or 0)
        if started and now - started < min_age:
            continue
        owner = ServerOwner.from_dict(handle.get("owner"))
        if owner is None:
            if stop_unowned:
                orphans.append((info, "it names no DAG run"))
            continue
        state = run_state(owner.dag_id, owner.run_id)
        if state not in ACTIVE_RUN_STATES:
            orphans.append(
                (
                    info,
                    f"DAG run {owner.dag_id} / {owner.run_id} is no longer queued or running "
                    f"({state or 'unknown to Airflow'})",
                )
            )
    return orphans


class TritonServerReaperOperator(BaseOperator):
    """Stop the servers of one runtime that no run keeps any more: lease expired, keeper gone, run ended.

    The teardown task normally stops a run's server, and a local server's supervisor stops it when its
    lease runs out; this is the safety net for what escapes both (a worker lost mid-start, a hung keeper,
    a run marked failed by hand). It finds the servers from the host and the platform, never from the
    metadata database: local servers by their processes (``--id=abi-...``) and their folders under
    ``work_root``, docker containers and Kubernetes Pods by label, ECS tasks by ``startedBy``. It asks
    Airflow, through the task SDK (no database access from the task), only for each one's DAG run state.
    It returns (and logs) each server it stopped, or would stop with ``dry_run``, with the reason.

    :param runtime: ``local``, ``docker``, ``kubernetes`` or ``ecs``.
    :param runtime_options: the options the DAGs give that runtime (Docker host, namespace, cluster, ...).
    :param min_age: seconds a server must have existed before it may be stopped for its run's state (an
        expired lease or a dead keeper need no wait).
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
        release_slot_at_exit()
        runtime = get_runtime(self.runtime, **self.runtime_options)
        run_state = run_states(context["ti"])

        servers = runtime.list_servers()
        orphans = select_orphans(
            servers, run_state, now=time.time(), min_age=self.min_age, stop_unowned=self.stop_unowned
        )
        self.log.info("%d %s server(s) found, %d orphaned.", len(servers), self.runtime, len(orphans))
        reaped = []
        for info, reason in orphans:
            server_id = info.handle.get("server_id")
            if self.dry_run:
                self.log.info("Would stop Triton server %s: %s (dry run).", server_id, reason)
                stopped = False
            elif not _still_orphaned(runtime, info, reason):
                self.log.info("Triton server %s: its lease was renewed meanwhile; left alone.", server_id)
                continue
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
        sweep = getattr(runtime, "sweep", None)
        if callable(sweep) and not self.dry_run:
            removed = sweep()
            if removed:
                self.log.info("Removed shared-memory regions of servers that are gone: %s", removed)
        return reaped


def run_states(ti: Any) -> Callable[[str, str], str | None]:
    """``(dag_id, run_id) -> state`` through the task SDK, asking Airflow once per run.

    :param ti: the asking task's instance (``context["ti"]``).
    """
    return functools.cache(functools.partial(run_state_of, ti))


def run_state_of(ti: Any, dag_id: str, run_id: str) -> str | None:
    """The DAG run's state through the task SDK (no database access); ``None`` for a run Airflow lacks.

    :param ti: the asking task's instance (``context["ti"]``).
    :param dag_id: the run's DAG.
    :param run_id: the run.
    """
    if ti.get_dr_count(dag_id=dag_id, run_ids=[run_id], states=list(ACTIVE_RUN_STATES)) > 0:
        return "running"
    try:
        state = ti.get_dagrun_state(dag_id=dag_id, run_id=run_id)
    except Exception:
        return None
    return str(getattr(state, "value", state)) if state else None


def _still_orphaned(runtime: Any, info: ServerInfo, reason: str) -> bool:
    """Look again just before stopping a server for its lease: a task may have renewed it meanwhile."""
    if not reason.startswith("its lease expired"):
        return True
    server_id = info.handle.get("server_id")
    for again in runtime.list_servers():
        if again.handle.get("server_id") == server_id:
            return lease_expired(again.handle, time.time()) is not None
    return True
