"""Waiting for a launched server: HTTP readiness of the server and its models (:mod:`.probe`), with a
bounded deadline.

One coroutine serves both the blocking wait (:meth:`TritonRuntime.wait_ready`) and the deferrable one
(``TritonServerReadyTrigger``). Between polls it asks the runtime whether the server is still there, so that
a server that dies fails at once, with its last log lines, instead of at the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import httpx

from airflow_batch_infer.runtimes.base import ServerInfo
from airflow_batch_infer.runtimes.probe import client_options, probe_server_async

if TYPE_CHECKING:
    from airflow_batch_infer.runtimes.base import TritonRuntime

log = logging.getLogger(__name__)

#: Consecutive failures of the runtime's own API (docker, Kubernetes, ECS) before the wait gives up.
MAX_API_ERRORS = 5
LOG_LINES = 40


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
    async with httpx.AsyncClient(**client_options(info, 5.0)) as client:
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
                probe = await probe_server_async(client, info.http_url, server_id, models)
                if probe.foreign:
                    log.info("Another server answers at %s; waiting for %s.", info.http_url, server_id)
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
