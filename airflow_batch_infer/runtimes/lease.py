"""A server's lease: the run's sign of life, renewed while the run uses the server.

Every server gets a lease at launch. The run renews it (the start task while it waits, each infer task
while it streams, persist) with :func:`renew`; a server whose lease is older than its ``lease_timeout`` is
stopped by its keeper (the local runtime's supervisor) or by the reaper, so that no server lives long
without its run.

Local servers keep the lease in a file, ``<server folder>/lease`` (``$BATCH_INFER_HOME/servers/<server
id>/lease`` by default): its modification time is the last renewal, its content the timeout.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from airflow_batch_infer.runtimes.base import DEFAULT_LEASE_TIMEOUT, ServerInfo

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_LEASE_TIMEOUT", "keep_renewed", "renew"]

LEASE_FILE = "lease"


def lease_path(handle: dict[str, Any]) -> Path | None:
    """The lease file of a local server's handle (``None`` when it has no folder)."""
    workdir = handle.get("workdir")
    return Path(workdir) / LEASE_FILE if workdir else None


def write_lease(path: Path, timeout: float) -> None:
    """Create or reset the lease file at ``path``: renewed now, with ``timeout`` recorded in it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"timeout": float(timeout), "created_at": time.time()}) + "\n")
    tmp.replace(path)


def read_lease(path: Path) -> tuple[float, float] | None:
    """``(seconds since the last renewal, timeout)`` of a lease file; ``None`` when there is none."""
    try:
        age = time.time() - path.stat().st_mtime
        timeout = float(json.loads(path.read_text()).get("timeout") or 0)
    except (OSError, ValueError, AttributeError):
        return None
    return age, timeout


def renew_local(handle: dict[str, Any]) -> bool:
    """Renew a local server's lease (touch its file); ``False`` when it has none or is on another host."""
    path = lease_path(handle)
    if path is None or not handle.get("lease_timeout"):
        return False
    host = handle.get("hostname")
    if host and host != socket.gethostname():
        log.warning(
            "Cannot renew the lease of Triton server %s: it runs on host %r, this is %r.",
            handle.get("server_id"),
            host,
            socket.gethostname(),
        )
        return False
    try:
        os.utime(path)
    except FileNotFoundError:
        log.warning(
            "Triton server %s has no lease at %s any more: it was stopped (see its 'stopped' file).",
            handle.get("server_id"),
            path,
        )
        return False
    return True


def renew(server: dict[str, Any] | ServerInfo, runtime_options: dict[str, Any] | None = None) -> bool:
    """Renew the lease of a server, or of every server of a start task's fleet: call it from every task that
    uses them, at least every few minutes.

    Cheap (one ``utime`` for a local server), and never raises for a server that is gone: it returns
    ``False`` and logs why, so that a task carries on and fails, if it must, on the server itself.

    :param server: what the start task returned (its fleet, e.g. ``start.output``), one server's
        ``ServerInfo.to_dict()``, or a :class:`ServerInfo`.
    :param runtime_options: the runtime's options, as given to the start task (needed by remote runtimes).
    :returns: whether every lease was renewed.
    """
    from airflow_batch_infer.runtimes import get_runtime
    from airflow_batch_infer.runtimes.fleet import fleet_servers

    renewed = []
    for info in fleet_servers(server):
        if info.runtime == "local":
            renewed.append(renew_local(info.handle))
            continue
        try:
            renewed.append(get_runtime(info.runtime, **(runtime_options or {})).renew_lease(info))
        except Exception as exc:
            log.warning(
                "Could not renew the lease of Triton server %s: %s", info.handle.get("server_id"), exc
            )
            renewed.append(False)
    return bool(renewed) and all(renewed)


@contextmanager
def keep_renewed(
    server: dict[str, Any] | ServerInfo, runtime_options: dict[str, Any] | None = None, interval: float = 60.0
) -> Iterator[None]:
    """Renew a server's lease now, then every ``interval`` seconds in a thread of its own, while the block
    runs (an infer task streaming its chunk).

    :param server: what the start task returned, or a :class:`ServerInfo`.
    :param runtime_options: the runtime's options, as given to the start task (needed by remote runtimes).
    :param interval: seconds between renewals; keep it well under the server's ``lease_timeout``.
    """
    renew(server, runtime_options)
    done = threading.Event()

    def renew_until_done() -> None:
        while not done.wait(interval):
            renew(server, runtime_options)

    thread = threading.Thread(target=renew_until_done, name="lease-renewal", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)
