"""A run's servers: N replicas of one Triton server, each with its own endpoint, all started at once.

The start task returns a *fleet*: the first server's fields (``runtime``, ``grpc_url``, ``handle``, ... as
one :class:`ServerInfo` has them, for code that knows one server) and ``servers``, the list of every
replica's. The infer tasks spread their chunks over the replicas and fail over between them; the stop
task, the lease renewals and the reaper deal with each replica as with any server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from airflow_batch_infer.runtimes.base import ServerInfo, TritonRuntime
from airflow_batch_infer.runtimes.labels import ServerOwner
from airflow_batch_infer.runtimes.readiness import wait_until_ready

log = logging.getLogger(__name__)

#: Runtimes whose replicas share one host's GPUs (each gets its share); the others get a node or task each.
SHARED_HOST_RUNTIMES = ("local", "docker")


def fleet_servers(value: Any) -> list[ServerInfo]:
    """Every server of what a start task returned: a fleet, one server's dict, or nothing (a URL, ``None``).

    :param value: ``start.output`` (a fleet or a :class:`ServerInfo` dict), a :class:`ServerInfo`, or a URL.
    """
    if isinstance(value, ServerInfo):
        return [value]
    if not isinstance(value, Mapping) or not value.get("runtime"):
        return []
    members = value.get("servers")
    if members:
        return [ServerInfo.from_dict(dict(m)) for m in members]
    return [ServerInfo.from_dict({k: v for k, v in value.items() if k != "servers"})]


def fleet_output(servers: Sequence[ServerInfo]) -> dict[str, Any]:
    """What a start task returns for ``servers``: the first one's fields, and ``servers`` with every one's."""
    if not servers:
        raise ValueError("A fleet has at least one server.")
    return {**servers[0].to_dict(), "servers": [s.to_dict() for s in servers]}


def visible_gpus() -> list[str]:
    """This host's GPUs that a server may use: ``CUDA_VISIBLE_DEVICES`` when set, else ``nvidia-smi -L``."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def resolve_servers(servers: int | str, runtime: str, gpus: Sequence[str] | None = None) -> int:
    """How many servers ``servers`` means: a positive int, or ``"auto"``: one per visible GPU on a shared host
    (1 without GPUs), 1 for the kubernetes and ecs runtimes (say how many nodes you want).

    :param servers: an int (or its text, from a template) or ``"auto"``.
    :param runtime: the runtime's name.
    :param gpus: the visible GPUs (:func:`visible_gpus` when ``None``).
    """
    if isinstance(servers, str) and servers.strip().lower() == "auto":
        if runtime not in SHARED_HOST_RUNTIMES:
            return 1
        return max(1, len(visible_gpus() if gpus is None else gpus))
    try:
        count = int(servers)
    except (TypeError, ValueError):
        raise ValueError(f"servers must be a positive integer or 'auto', not {servers!r}.") from None
    if count < 1:
        raise ValueError(f"servers must be at least 1, not {count}.")
    return count


def gpu_share(replica: int, replicas: int, gpus: Sequence[str]) -> list[str]:
    """The GPUs of replica ``replica`` of ``replicas`` on a host with ``gpus``: contiguous, as even as can be
    (every GPU to each replica when there are fewer GPUs than replicas, or none)."""
    if not gpus or len(gpus) < replicas:
        return list(gpus)
    size, extra = divmod(len(gpus), replicas)
    start = replica * size + min(replica, extra)
    return list(gpus[start : start + size + (1 if replica < extra else 0)])


def replica_options(
    runtime: str, options: Mapping[str, Any], replica: int, replicas: int, gpus: Sequence[str]
) -> dict[str, Any]:
    """The runtime options of one replica: on a shared host, its share of the GPUs.

    Local servers see only their share (``CUDA_VISIBLE_DEVICES``); docker ones are given those devices. A
    Pod or an ECS task asks its platform for GPUs of its own (anti-affinity spreads the Pods over nodes).

    :param runtime: the runtime's name.
    :param options: the start task's runtime options.
    :param replica: the replica's index, from 0.
    :param replicas: how many there are.
    :param gpus: the host's visible GPUs.
    """
    options = dict(options)
    if replicas == 1 or runtime not in SHARED_HOST_RUNTIMES or not gpus or len(gpus) < replicas:
        return options
    share = gpu_share(replica, replicas, gpus)
    if runtime == "local":
        options["environment"] = {
            **dict(options.get("environment") or {}),
            "CUDA_VISIBLE_DEVICES": ",".join(share),
        }
    elif options.get("gpus", 1) not in (0, "0"):
        options["gpus"] = share
    return options


def replica_owner(owner: ServerOwner | None, replica: int) -> ServerOwner | None:
    """The owner recorded on replica ``replica`` (so that a retried start reattaches to each one)."""
    return replace(owner, replica=replica) if owner is not None else None


async def wait_fleet_ready(
    runtime: TritonRuntime,
    servers: Sequence[ServerInfo],
    models: list[str] | None,
    deadline: float,
    poll_interval: float,
    min_ready: int,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Wait for the replicas at once until ``min_ready`` are ready, or too many failed to reach it.

    Replicas still loading then are kept (they join when ready: the infer tasks use ready ones only);
    replicas that failed are left out and reported.

    :returns: ``{"status": "ready", "ready": [...], "loading": [...], "failed": [...], "message": ...}``
        (server dicts; failures as ``{"server": ..., "message": ...}``), or ``status`` ``"error"``.
    """
    tasks = {
        asyncio.ensure_future(wait_until_ready(runtime, info, models, deadline, poll_interval)): info
        for info in servers
    }
    ready: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    pending = set(tasks)
    while pending and len(ready) < min_ready and len(servers) - len(failed) >= min_ready:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            event = task.result()
            if on_event:
                on_event(event)
            if event["status"] == "ready":
                ready.append(event["server"])
            else:
                failed.append({"server": event["server"], "message": event["message"]})
    for task in pending:
        task.cancel()
    loading = [tasks[t].to_dict() for t in pending]
    if len(ready) >= min_ready:
        return {
            "status": "ready",
            "ready": ready,
            "loading": loading,
            "failed": failed,
            "message": f"{len(ready)} of {len(servers)} Triton servers ready ({len(loading)} still loading, "
            f"{len(failed)} failed).",
        }
    reasons = "\n\n".join(f["message"] for f in failed)
    return {
        "status": "error",
        "ready": ready,
        "loading": loading,
        "failed": failed,
        "message": f"Only {len(ready)} of {len(servers)} Triton servers became ready, fewer than "
        f"min_ready={min_ready}.\n{reasons}",
    }
