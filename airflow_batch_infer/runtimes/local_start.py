"""Starting a local server: spawn its supervisor, wait until it and its models are ready, or fail with the
server's own error lines and remove what was started.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from airflow_batch_infer.runtimes.base import ServerInfo, ServerStartError
from airflow_batch_infer.runtimes.local_env import ServerEnv
from airflow_batch_infer.runtimes.local_inventory import write_record
from airflow_batch_infer.runtimes.local_log import HANG_HINTS, PORT_CLASH_HINTS, read_tail, server_errors
from airflow_batch_infer.runtimes.local_processes import remove_shm, server_processes, sigkill, wait_gone
from airflow_batch_infer.runtimes.probe import client_options, probe_server


class PortClashError(Exception):
    """The server could not bind one of its ports (picked free, then taken by someone else)."""


def spawn(
    cmd: list[str], env: ServerEnv, info: ServerInfo, environment: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` (the supervisor) in a session of its own, logging to ``server.log``; record the server.

    :param cmd: :func:`~airflow_batch_infer.runtimes.local_command.server_command`.
    :param env: the server environment (its process environment).
    :param info: the server's handle; ``pid`` is set to the supervisor's.
    :param environment: more environment variables of the server (beyond its allowlist).
    """
    h = info.handle
    log_path = Path(h["log_path"])
    if log_path.exists():  # keep an earlier attempt's log (port clash) for the record
        log_path.replace(log_path.with_name(f"server.{time.time_ns()}.log"))
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env.process_env(environment),
            cwd=h["workdir"],
            start_new_session=True,
        )
    h["pid"] = proc.pid
    write_record(Path(h["workdir"]), info)
    return proc


def wait_ready(
    proc: subprocess.Popen[bytes],
    info: ServerInfo,
    models: list[str],
    deadline: float,
    renew: Callable[[ServerInfo], Any],
) -> None:
    """Poll until the server (our id on our port) and ``models`` are ready; renew its lease meanwhile.

    :param proc: the supervisor.
    :param info: the server's handle.
    :param models: models that must be ready.
    :param deadline: ``time.monotonic()`` after which the start fails.
    :param renew: renews the server's lease.
    :raises PortClashError: when the server exited because one of its ports was taken.
    :raises ServerStartError: with the server's own error lines.
    """
    server_id = info.handle["server_id"]
    log_path = info.handle["log_path"]
    foreign = False
    with httpx.Client(**client_options(info, 2.0)) as client:
        while True:
            code = proc.poll()
            if code is not None:
                tail = read_tail(log_path, 200).lower()
                if foreign or any(hint in tail for hint in PORT_CLASH_HINTS):
                    raise PortClashError
                fail(info, f"tritonserver exited with code {code} before it was ready")
            if time.monotonic() > deadline:
                fail(info, "it was not ready within its startup_timeout")
            hang = next((h for h in HANG_HINTS if h in read_tail(log_path, 100)), None)
            if hang:
                fail(info, f"a Python backend stub failed ({hang!r}), so the model would never load")
            renew(info)
            probe = probe_server(client, info.http_url, server_id, models, explain=False)
            if probe.ready:
                return
            foreign = foreign or probe.foreign  # another server answers on our port; ours will fail to bind
            time.sleep(0.05)


def fail(info: ServerInfo, why: str) -> None:
    """Raise :class:`ServerStartError` with the server's own error lines and the end of its log."""
    tail = read_tail(info.handle["log_path"], 40)
    errors = server_errors(read_tail(info.handle["log_path"], 2000))
    found = "Errors reported by the server:\n" + "\n".join(errors) + "\n" if errors else ""
    raise ServerStartError(
        f"Triton server {info.handle['server_id']} did not start: {why}.\n{found}"
        f"Last lines of {info.handle['log_path']}:\n{tail}\n"
        "Fix the model named in the errors above (config.pbtxt, model files, model.py), or raise "
        "startup_timeout if models are slow to load; run with log_verbose=1 for more detail."
    )


def kill_failed(proc: subprocess.Popen[bytes], info: ServerInfo, reap: Callable[[], None]) -> None:
    """SIGKILL every process of a server that failed to start, and remove its shared memory."""
    server_id, workdir = info.handle["server_id"], info.handle.get("workdir")
    sigkill(server_processes(server_id, workdir))
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    sigkill(wait_gone(server_id, workdir, 5, reap))
    remove_shm(info.handle["shm_prefix"])
