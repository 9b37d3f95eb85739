"""Waiting for a launched server: HTTP readiness of the server and its models, with a bounded deadline.

One coroutine serves both the blocking wait (:meth:`TritonRuntime.wait_ready`) and the deferrable one
(``TritonServerReadyTrigger``). Between polls it asks the runtime whether the server is still there, so that
a server that dies fails at once, with its last log lines, instead of at the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from airflow_batch_infer.runtimes.access import server_headers
from airflow_batch_infer.runtimes.base import ServerInfo

if TYPE_CHECKING:
    from airflow_batch_infer.runtimes.base import TritonRuntime

log = logging.getLogger(__name__)

#: Consecutive failures of the runtime's own API (docker, Kubernetes, ECS) before the wait gives up.
MAX_API_ERRORS = 5
LOG_LINES = 40


@dataclass
class Probe:
    """What one round of HTTP requests found out."""

    answering: bool = False
    ready: bool = False
    error: str | None = None
    models_ready: dict[str, bool] = field(default_factory=dict)


async def probe_server(
    client: httpx.AsyncClient, http_url: str, server_id: str | None, models: list[str]
) -> Probe:
    """Ask ``/v2`` (identity), ``/v2/health/ready``, each model's ``ready`` and, if needed, the index.

    A model that the server does not have, or that it reports ``UNAVAILABLE`` with a reason, is an
    error: it will never become ready.
    """
    probe = Probe()
    try:
        meta = await client.get(f"{http_url}/v2")
    except httpx.HTTPError:
        return probe
    if meta.status_code != 200:
        return probe
    try:
        name = meta.json().get("name")
    except ValueError:
        name = None
    if server_id and name != server_id:
        log.info("Another server (%r, not %r) answers at %s; waiting for ours.", name, server_id, http_url)
        return probe
    probe.answering = True
    try:
        server_ready = (await client.get(f"{http_url}/v2/health/ready")).status_code == 200
        for model in models:
            response = await client.get(f"{http_url}/v2/models/{model}/ready")
            probe.models_ready[model] = response.status_code == 200
        if server_ready and all(probe.models_ready.values()):
            probe.ready = True
            return probe
        pending = [m for m, ready in probe.models_ready.items() if not ready]
        if pending:
            index = await client.post(f"{http_url}/v2/repository/index", json={})
            if index.status_code == 200:
                probe.error = _index_error(index.json(), pending)
    except httpx.HTTPError:
        probe.answering = False
    return probe


def _index_error(index: list[dict[str, Any]], pending: list[str]) -> str | None:
    entries: dict[str, list[dict[str, Any]]] = {}
    for entry in index:
        entries.setdefault(entry.get("name", ""), []).append(entry)
    available = sorted(entries)
    for model in pending:
        if model not in entries:
            return f"model {model!r} is not in the server's model repository (it has {available})"
        reasons = [
            e.get("reason") for e in entries[model] if e.get("state") == "UNAVAILABLE" and e.get("reason")
        ]
        if reasons:
            return f"model {model!r} failed to load: {reasons[0]}"
    return None


def probe_server_sync(info: ServerInfo, models: list[str] | None, timeout: float = 5.0) -> bool:
    """Whether the server of ``info`` (its id on its port) and ``models`` are ready now.

    :param info: the server.
    :param models: models that must be ready.
    :param timeout: seconds for each HTTP request.
    """

    async def probe() -> bool:
        headers = server_headers(info, "http")
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), headers=headers) as client:
            server_id = info.handle.get("server_id")
            found = await probe_server(client, info.http_url, server_id, list(models or []))
            return found.ready

    from airflow_batch_infer.runtimes.base import run_coroutine

    return bool(run_coroutine(probe()))


async def wait_until_ready(
    runtime: TritonRuntime,
    info: ServerInfo,
    models: list[str] | None,
    deadline: float,
    poll_interval: float = 5.0,
) -> dict[str, Any]:
    """Poll until the server and ``models`` are ready, the server dies, or ``deadline`` passes.

    :param runtime: the runtime that launched the server (asked whether it still runs, and for its log).
    :param info: what :meth:`~TritonRuntime.launch` returned.
    :param models: models that must be ready (the server's own readiness covers all when ``None``).
    :param deadline: epoch seconds (``time.time()``) after which the wait fails.
    :param poll_interval: seconds between polls.
    :returns: ``{"status": "ready", "server": ..., "message": ...}`` or ``{"status": "error", ...}`` with
        the server's last log lines in ``message`` and ``log_tail``.
    """
    models = list(models or [])
    server_id = info.handle.get("server_id")
    api_errors = 0
    started = time.time()
    headers = server_headers(info, "http")  # the index call is restricted on a server with a key
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0), headers=headers) as client:
        while True:
            if not info.http_url:
                try:
                    info = await asyncio.to_thread(runtime.refresh, info)
                except Exception as exc:
                    log.warning("Could not look up the server's address yet: %s", exc)
            try:  # the wait is the run's sign of life: a slow load must not outlast the lease
                await asyncio.to_thread(runtime.renew_lease, info)
            except Exception as exc:
                log.warning("Could not renew the lease of Triton server %s: %s", server_id, exc)
            if info.http_url:
                probe = await probe_server(client, info.http_url, server_id, models)
                if probe.ready:
                    return {
                        "status": "ready",
                        "server": info.to_dict(),
                        "message": f"Triton server {server_id} ready in {time.time() - started:.1f} s "
                        f"({info.runtime} runtime): gRPC {info.grpc_url}, models {models or 'all'}.",
                    }
                if probe.error:
                    return await _error(runtime, info, probe.error)
            try:
                reason = await asyncio.to_thread(runtime.failure_reason, info)
                api_errors = 0
            except Exception as exc:
                api_errors += 1
                log.warning("Could not tell whether Triton server %s runs: %s", server_id, exc)
                if api_errors >= MAX_API_ERRORS:
                    return await _error(runtime, info, f"its runtime could not tell whether it runs: {exc}")
                reason = None
            if reason:
                return await _error(runtime, info, reason)
            remaining = deadline - time.time()
            if remaining <= 0:
                waited = time.time() - started
                return await _error(
                    runtime,
                    info,
                    f"it was not ready {waited:.0f} s after the wait began (startup_timeout); raise "
                    "startup_timeout if its models are slow to load",
                )
            await asyncio.sleep(min(poll_interval, remaining))


async def _error(runtime: TritonRuntime, info: ServerInfo, why: str) -> dict[str, Any]:
    try:
        tail = await asyncio.to_thread(runtime.log_tail, info, LOG_LINES)
    except Exception as exc:
        tail = f"(its log could not be read: {exc})"
    server_id = info.handle.get("server_id", "")
    message = (
        f"Triton server {server_id} ({info.runtime} runtime) did not become ready: {why}.\n"
        f"Last lines of its log:\n{tail}"
    )
    return {"status": "error", "server": info.to_dict(), "message": message, "log_tail": tail}
