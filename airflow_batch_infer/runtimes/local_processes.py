"""Processes of local servers on this host, found by identity (their command line), and what they leave
behind (POSIX shared-memory regions named by the server's prefix).

A local server is three kinds of process: its supervisor (``supervisor.py ... -- tritonserver --id=<id>``),
``tritonserver --id=<id> --model-repository=<folder>/models`` and one Python backend stub per model instance
(whose command line names the model's path in ``<folder>/models``). :func:`server_processes` finds all of
them by the server id and folder, never by a bare pid that the kernel may have given to someone else.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_batch_infer.runtimes.lease import lease_path

log = logging.getLogger(__name__)

#: The marker in every server's command line: ``--id=abi-<12 hex digits>``.
ID_FLAG = "--id="
SHM_DIR = Path("/dev/shm")  # noqa: S108 (POSIX shared memory, named by our own prefix)


@dataclass(frozen=True)
class ServerProcess:
    """One live process of a local server.

    :param pid: its pid.
    :param pgid: its process group.
    :param ppid: its parent.
    :param role: ``supervisor``, ``tritonserver``, ``guard`` (kills the group when the supervisor dies) or
        ``stub``.
    :param cmdline: its command line, arguments joined by spaces.
    """

    pid: int
    pgid: int
    ppid: int
    role: str
    cmdline: str


def _stat(pid: int | str) -> tuple[str, int, int] | None:
    """State, parent and process group of ``pid`` from ``/proc/<pid>/stat``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[2])


def cmdline(pid: int | str) -> list[str]:
    """The arguments of ``pid`` (empty when it is gone or not readable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _role(args: list[str]) -> str:
    if any(a.endswith("supervisor.py") for a in args[:3]):
        return "supervisor"
    if args and Path(args[0]).name == "tritonserver":
        return "tritonserver"
    if len(args) > 2 and args[1] == "-c" and "killpg" in args[2]:
        return "guard"
    return "stub"


def live_processes(markers: list[str]) -> list[ServerProcess]:
    """Live (not zombie) processes whose command line contains one of ``markers``, this process excepted."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        args = cmdline(entry.name)
        if not args:
            continue
        joined = " ".join(args)
        if not any(m in joined for m in markers):
            continue
        stat = _stat(entry.name)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        found.append(ServerProcess(int(entry.name), stat[2], stat[1], _role(args), joined))
    return found


def server_processes(server_id: str, workdir: str | None = None) -> list[ServerProcess]:
    """Every live process of the server ``server_id``: supervisor, ``tritonserver`` and its stubs.

    :param server_id: the server's id (``abi-...``), in ``--id=`` of the supervisor's and server's command.
    :param workdir: the server's folder; its stubs name their model's path in it.
    """
    markers = [f"{ID_FLAG}{server_id}"]
    if workdir:
        markers.append(str(Path(workdir) / "models") + "/")
    return live_processes(markers)


def all_server_ids(work_root: str | Path | None = None) -> dict[str, list[ServerProcess]]:
    """Server id → its live supervisor and ``tritonserver`` processes, for every local server on this host.

    :param work_root: only servers whose model repository lies under this folder.
    """
    servers: dict[str, list[ServerProcess]] = {}
    root = f"--model-repository={Path(work_root).resolve()}/" if work_root else "--model-repository="
    for proc in live_processes([f"{ID_FLAG}abi-"]):
        args = proc.cmdline.split(" ")
        if not any(a.startswith(root) for a in args):
            continue
        ids = [a[len(ID_FLAG) :] for a in args if a.startswith(f"{ID_FLAG}abi-")]
        if ids:
            servers.setdefault(ids[0], []).append(proc)
    return servers


def signal_processes(processes: list[ServerProcess], signum: int) -> None:
    """Send ``signum`` to each of ``processes`` (those already gone are skipped)."""
    for proc in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signum)


def wait_gone(
    server_id: str, workdir: str | None, timeout: float, reap: Callable[[], None] | None = None
) -> list[ServerProcess]:
    """Wait until no process of the server is left, at most ``timeout`` seconds; return those left.

    :param reap: a callable run before each look, to collect our own exited children (no zombies).
    """
    deadline = time.monotonic() + timeout
    while True:
        if reap is not None:
            reap()
        left = server_processes(server_id, workdir)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def remove_shm(prefix: str) -> list[str]:
    """Remove the shared-memory regions named ``<prefix>*``; return their names."""
    removed = []
    if prefix and SHM_DIR.is_dir():
        for region in SHM_DIR.glob(f"{prefix}*"):
            try:
                region.unlink()
                removed.append(region.name)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("Could not remove shared memory region %s: %s", region, exc)
    if removed:
        log.info("Removed leftover shared memory regions: %s", removed)
    return removed


def remove_leftovers(handle: dict[str, Any]) -> None:
    """Remove what a stopped server leaves: shared memory, the model repository copy, the lease.

    :param handle: the server's handle (``shm_prefix``, ``workdir``).
    """
    if handle.get("shm_prefix"):
        remove_shm(handle["shm_prefix"])
    if handle.get("workdir"):
        shutil.rmtree(Path(handle["workdir"]) / "models", ignore_errors=True)
        path = lease_path(handle)
        if path is not None:
            path.unlink(missing_ok=True)


def remove_orphaned_server_shm() -> list[str]:
    """Remove the Python backend's regions of servers that are gone without a stop (SIGKILLed, say).

    Regions are named ``<server id>-shm-...``; a server is alive while a process has ``--id=<server id>``,
    so a running server's regions are never unlinked.
    """
    regions = list(SHM_DIR.glob("abi-*-shm-*")) if SHM_DIR.is_dir() else []
    if not regions:
        return []
    alive = set()
    for proc in live_processes([f"{ID_FLAG}abi-"]):
        alive.update(a[len(ID_FLAG) :] for a in proc.cmdline.split(" ") if a.startswith(f"{ID_FLAG}abi-"))
    removed = []
    for server_id in {r.name.split("-shm-", 1)[0] for r in regions} - alive:
        removed += remove_shm(f"{server_id}-shm-")
    return removed


def sigkill(processes: list[ServerProcess]) -> None:
    """SIGKILL each of ``processes``."""
    signal_processes(processes, signal.SIGKILL)


def terminate(
    processes: list[ServerProcess],
    server_id: str,
    workdir: str | None,
    grace: float,
    reap: Callable[[], None] | None = None,
) -> list[ServerProcess]:
    """Stop a server's ``processes``: SIGTERM to its supervisor (which passes it on and does not restart),
    SIGKILL to whatever of the server is left after ``grace`` seconds, looked up again by identity.

    :returns: the processes still there after three rounds of SIGKILL (none, normally).
    """
    keepers = [p for p in processes if p.role == "supervisor"]
    signal_processes(keepers or processes, signal.SIGTERM)
    left = wait_gone(server_id, workdir, grace, reap)
    for _ in range(3):
        if not left:
            break
        log.info("Triton %s: %d process(es) left %g s after SIGTERM; SIGKILL.", server_id, len(left), grace)
        sigkill(sorted(left, key=lambda p: p.role != "supervisor"))  # the keeper first: no restart
        left = wait_gone(server_id, workdir, 5, reap)
    return left
