"""The embedded default runtime: a real ``tritonserver`` process on this machine, kept by a supervisor.

The binary comes from the PyPI wheel ``nvidia-pytriton`` (Triton 2.51 with only the Python backend), installed
in a server environment of its own (numpy<2, :mod:`.local_env`), apart from the project's environment. An
``onnxruntime`` model is served by a generic Python-backend model that runs the same ``model.onnx`` with
onnxruntime (:mod:`.local_repository`).

Each server is ``supervisor.py`` (in a session of its own) → ``tritonserver`` (dies with the supervisor:
parent-death signal) → one Python backend stub per model instance. The supervisor stops the server when its
lease (:mod:`.lease`) is not renewed for ``lease_timeout`` seconds. :meth:`LocalTritonRuntime.stop` finds
every one of these processes by the server's id and folder (:mod:`.local_processes`), not by a pid alone.

``python -m airflow_batch_infer.runtimes.local prepare`` builds the server environment ahead of time.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from airflow_batch_infer.paths import batch_infer_home, triton_server_env
from airflow_batch_infer.runtimes.base import ServerInfo, TritonRuntime
from airflow_batch_infer.runtimes.labels import ServerOwner
from airflow_batch_infer.runtimes.lease import DEFAULT_LEASE_TIMEOUT, renew_local
from airflow_batch_infer.runtimes.local_command import READY_FILE, server_command, server_info
from airflow_batch_infer.runtimes.local_env import (
    ServerEnv,
    check_server_numpy,
    ensure_server_env,
    probe_python,
)
from airflow_batch_infer.runtimes.local_inventory import find_servers
from airflow_batch_infer.runtimes.local_log import HANG_HINTS, PORT_CLASH_HINTS, read_tail, server_errors
from airflow_batch_infer.runtimes.local_processes import (
    free_ports,
    remove_leftovers,
    remove_orphaned_server_shm,
    server_processes,
    terminate,
)
from airflow_batch_infer.runtimes.local_repository import materialize_repository
from airflow_batch_infer.runtimes.local_start import PortClashError, fail, kill_failed, spawn, wait_ready
from airflow_batch_infer.runtimes.probe import answers_as

__all__ = ["LocalTritonRuntime", "ServerEnv", "check_server_numpy", "probe_python"]

log = logging.getLogger(__name__)

STOPPED_FILE = "stopped"  # written by the supervisor when the lease ran out: when and why

_PORT_ATTEMPTS = 3


class LocalTritonRuntime(TritonRuntime):
    """Runs ``tritonserver`` as a local process that outlives the task that started it, not its run.

    :param server_env: the server's prebuilt virtual environment (``prepare`` below; a start never builds
        it); default ``[batch_infer] triton_server_env``, else ``<home>/triton-server-env``.
    :param work_root: where each server gets its folder (model repository copy, ``server.log``, ``lease``);
        default ``$BATCH_INFER_HOME/servers``.
    :param startup_timeout: seconds to wait for the server and its models to be ready.
    :param stop_grace_period: seconds between SIGTERM and SIGKILL when stopping; 0 (the default) SIGKILLs
        right after the SIGTERM. The teardown runs once every infer task of the run has ended, so none of
        its requests is in flight, and the Python backend takes longer than Triton's exit timeout to unload
        a model anyway: a grace period only waits. Give one (a few seconds) for a model whose ``finalize``
        must run, or for a request of someone else's still in flight.
    :param log_verbose: Triton's ``--log-verbose`` level.
    :param onnx_intra_op_threads: onnxruntime intra-op threads per instance of a converted ONNX model.
    :param max_restarts: how often a server that dies after it was ready is started again, on the same
        ports, by its supervisor (as a container runtime's restart policy would); 0 leaves a dead server dead.
    :param grpc_tls: serve gRPC over TLS: ``server_cert`` and ``server_key`` (PEM files), and
        ``root_cert`` (the CA that signs client certificates) to require them (mutual TLS). Clients
        then need a ``triton`` connection with ``ssl`` and the CA (and their own certificate).
    :param lease_timeout: seconds the server lives without a lease renewal before its supervisor stops it
        (see :func:`airflow_batch_infer.runtimes.lease.renew`); ``0`` for no lease.
    :param auto_complete_config: let Triton complete Python models' configs from their
        ``auto_complete_config``; it starts one extra stub per model (about 1.3 s of each start), so it is
        off and each ``config.pbtxt`` must declare its inputs, outputs and batching.
    :param environment: environment variables of the server and its model stubs, besides an allowlist
        of the worker's (locale, ``TMPDIR``, thread settings): credentials in the worker's environment
        never reach the server.
    :param restricted_api: require the server's own key for model control and shared memory (:mod:`.access`):
        another local user's job can then neither map this run's regions nor load a model. The infer tasks
        send it; ``False`` opens both to whoever reaches the port (perf_analyzer with shared memory).
    """

    name = "local"

    def __init__(
        self,
        server_env: str | os.PathLike[str] | None = None,
        work_root: str | os.PathLike[str] | None = None,
        startup_timeout: float = 120,
        stop_grace_period: float = 0,
        log_verbose: int = 0,
        onnx_intra_op_threads: int = 1,
        max_restarts: int = 5,
        grpc_tls: dict[str, str] | None = None,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        auto_complete_config: bool = False,
        environment: dict[str, str] | None = None,
        restricted_api: bool = True,
    ) -> None:
        self.server_env = Path(server_env).expanduser() if server_env else triton_server_env()
        self.work_root = Path(work_root).expanduser() if work_root else batch_infer_home() / "servers"
        self.startup_timeout = float(startup_timeout)
        self.stop_grace_period = float(stop_grace_period)
        self.log_verbose = int(log_verbose)
        self.onnx_intra_op_threads = int(onnx_intra_op_threads)
        self.max_restarts = int(max_restarts)
        self.lease_timeout = float(lease_timeout or 0)
        self.auto_complete_config = bool(auto_complete_config)
        self.environment = dict(environment or {})
        self.restricted_api = bool(restricted_api)
        self.grpc_tls = dict(grpc_tls or {})
        unknown = set(self.grpc_tls) - {"server_cert", "server_key", "root_cert"}
        if unknown or (self.grpc_tls and not {"server_cert", "server_key"} <= set(self.grpc_tls)):
            raise ValueError(
                "grpc_tls takes server_cert and server_key (PEM files), and root_cert for mutual TLS; "
                f"got {sorted(self.grpc_tls)}."
            )
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ server environment, repository

    def ensure_server_env(self) -> ServerEnv:
        """Build the server environment if it is missing or out of date, and return it (:mod:`.local_env`)."""
        return ensure_server_env(self.server_env)

    def materialize_repository(
        self, model_repository: str | os.PathLike[str], models: list[str] | None, target: Path
    ) -> list[str]:
        """Copy the requested models into ``target``; ``onnxruntime`` models become Python-backend models.

        :param model_repository: the source repository (``<model>/config.pbtxt``, ``<model>/<version>/``).
        :param models: model names to copy; all models in the repository when ``None``.
        :param target: the new repository folder (created).
        :returns: the names of the models copied.
        """
        return materialize_repository(model_repository, models, target, self.onnx_intra_op_threads)

    # ------------------------------------------------------------------ start

    def _prepare(
        self, model_repository: str, models: list[str] | None
    ) -> tuple[ServerEnv, str, Path, Path, list[str]]:
        """The server environment, a new server id and folder, and the materialised repository in it."""
        env = ensure_server_env(self.server_env, build=False)  # a task never installs packages
        remove_orphaned_server_shm()
        server_id = f"abi-{uuid.uuid4().hex[:12]}"
        workdir = (self.work_root / server_id).resolve()
        repo = workdir / "models"
        workdir.mkdir(parents=True)
        try:
            names = self.materialize_repository(model_repository, models, repo)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return env, server_id, workdir, repo, names

    def launch(
        self, model_repository: str, models: list[str] | None = None, owner: ServerOwner | None = None
    ) -> ServerInfo:
        """Start ``tritonserver`` for ``models`` and return at once, before it is ready.

        Waiting is left to :meth:`wait_ready` or ``TritonServerReadyTrigger``; unlike :meth:`start`, a port
        taken between choosing it and binding it is reported as a failure, not retried.

        :param model_repository: path of the model repository.
        :param models: names of the models to serve; every model in the repository when ``None``.
        :param owner: the task instance that starts it, recorded in the server's folder.
        """
        env, server_id, workdir, repo, names = self._prepare(model_repository, models)
        info = server_info(server_id, workdir, free_ports(3), owner, models, self.lease_timeout)
        try:
            proc = self._launch(env, info, repo)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self._children[proc.pid] = proc
        log.info(
            "Triton %s launched (pid %d, models %s): gRPC %s; log %s",
            server_id,
            proc.pid,
            names,
            info.grpc_url,
            info.handle["log_path"],
        )
        return info

    def start(
        self, model_repository: str, models: list[str] | None = None, owner: ServerOwner | None = None
    ) -> ServerInfo:
        """Start ``tritonserver`` for ``models`` and wait until the server and every model are ready.

        :param model_repository: path of the model repository.
        :param models: names of the models to serve; every model in the repository when ``None``.
        :param owner: the task instance that starts it, recorded in the server's folder.
        """
        started = time.monotonic()
        env, server_id, workdir, repo, names = self._prepare(model_repository, models)

        for attempt in range(1, _PORT_ATTEMPTS + 1):
            info = server_info(server_id, workdir, free_ports(3), owner, models, self.lease_timeout)
            proc = self._launch(env, info, repo)
            try:
                wait_ready(proc, info, names, started + self.startup_timeout, self.renew_lease)
            except PortClashError:
                kill_failed(proc, info, self._reap_children)
                if attempt < _PORT_ATTEMPTS:
                    log.warning("Triton %s: a port was taken (attempt %d); retrying.", server_id, attempt)
                    continue
                shutil.rmtree(repo, ignore_errors=True)
                fail(info, f"its ports stayed taken after {_PORT_ATTEMPTS} attempts")
            except BaseException:
                kill_failed(proc, info, self._reap_children)
                shutil.rmtree(repo, ignore_errors=True)
                raise
            self._children[proc.pid] = proc
            self.mark_ready(info)
            log.info(
                "Triton %s ready in %.1f s (pid %d, models %s): gRPC %s, HTTP %s, metrics %s; log %s",
                server_id,
                time.monotonic() - started,
                proc.pid,
                names,
                info.grpc_url,
                info.http_url,
                info.metrics_url,
                info.handle["log_path"],
            )
            return info
        raise AssertionError("unreachable")  # pragma: no cover

    def mark_ready(self, info: ServerInfo) -> None:
        """Record that the server was seen ready: from now on its supervisor restarts it if it dies."""
        (Path(info.handle["workdir"]) / READY_FILE).touch()
        self.renew_lease(info)

    def _launch(self, env: ServerEnv, info: ServerInfo, repo: Path) -> subprocess.Popen[bytes]:
        return spawn(server_command(env, info, repo, self), env, info, self.environment)

    # ------------------------------------------------------------------ lease

    def renew_lease(self, info: ServerInfo) -> bool:
        """Renew the server's lease (see :func:`airflow_batch_infer.runtimes.lease.renew`).

        :param info: what :meth:`start` returned.
        """
        return renew_local(info.handle)

    def sweep(self) -> list[str]:
        """Remove the shared-memory regions of local servers that are gone (never those of a live one)."""
        return remove_orphaned_server_shm()

    # ------------------------------------------------------------------ stop and inspect

    def _check_host(self, info: ServerInfo) -> None:
        host = info.handle.get("hostname")
        if host and host != socket.gethostname():
            raise RuntimeError(
                f"Triton server {info.handle.get('server_id')} runs on host {host!r}, not on "
                f"{socket.gethostname()!r}: the local runtime can only reach servers on its own host. Run "
                "the teardown task on that host (e.g. a worker queue pinned to it) or use a remote runtime."
            )

    def _reap_children(self) -> None:
        """Collect our own exited supervisors, so that none is left a zombie."""
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                self._children.pop(pid, None)

    def _is_ours(self, info: ServerInfo) -> bool:
        server_id = info.handle.get("server_id")
        if not server_id:
            return False
        self._reap_children()
        procs = server_processes(server_id)
        return any(p.role in ("supervisor", "tritonserver") for p in procs)

    def stop(self, info: ServerInfo) -> bool:
        """Stop the server by its identity: every process with its id or folder, whatever its parent.

        SIGTERM to the supervisor (which passes it on and does not restart), SIGKILL to whatever is left
        after ``stop_grace_period``; then the server must be gone and no longer answer on its port.

        :param info: what :meth:`start` returned (or its ``to_dict()`` round trip).
        :returns: ``False`` when it was already gone.
        :raises RuntimeError: when a process of the server, or the server on its port, is still there.
        """
        self._check_host(info)
        h = info.handle
        server_id, workdir = h.get("server_id"), h.get("workdir")
        if not server_id:
            return False
        self._reap_children()
        procs = server_processes(server_id, workdir)
        if not procs:
            log.info("Triton %s was already gone.", server_id)
            remove_leftovers(h)
            return False
        started = time.monotonic()
        left = terminate(procs, server_id, workdir, self.stop_grace_period, self._reap_children)
        if left:
            raise RuntimeError(
                f"Triton server {server_id} is still running after SIGKILL: "
                + ", ".join(f"pid {p.pid} ({p.role})" for p in left)
            )
        if answers_as(info.http_url, server_id):
            raise RuntimeError(
                f"Triton server {server_id} still answers at {info.http_url} although none of its processes "
                "is left on this host."
            )
        remove_leftovers(h)
        log.info("Triton %s stopped in %.2f s.", server_id, time.monotonic() - started)
        return True

    def is_running(self, info: ServerInfo) -> bool:
        """Whether the server's supervisor or ``tritonserver`` is still there (found by the server id).

        :param info: what :meth:`start` returned.
        """
        self._check_host(info)
        return self._is_ours(info)

    def log_tail(self, info: ServerInfo, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's ``server.log``.

        :param info: what :meth:`start` returned.
        :param lines: how many lines.
        """
        return read_tail(info.handle.get("log_path"), lines)

    def failure_reason(self, info: ServerInfo) -> str | None:
        """Why the server will never be ready: its process exited, or a Python backend stub failed.

        :param info: what :meth:`launch` returned.
        """
        self._check_host(info)
        tail = self.log_tail(info, 200)
        if not self._is_ours(info):
            if any(hint in tail.lower() for hint in PORT_CLASH_HINTS):
                return "tritonserver exited: one of its ports was taken by another process"
            errors = server_errors(self.log_tail(info, 2000))
            found = (": " + " | ".join(errors)) if errors else ""
            return f"tritonserver exited before it was ready{found}"
        hang = next((h for h in HANG_HINTS if h in tail), None)
        if hang:
            return f"a Python backend stub failed ({hang!r}), so the model would never load"
        return None

    def list_servers(self) -> list[ServerInfo]:
        """Every server of this ``work_root`` on this host, found on the host itself.

        See :func:`~airflow_batch_infer.runtimes.local_inventory.find_servers` for what each handle tells.
        """
        return find_servers(self.work_root)


def main(argv: list[str] | None = None) -> int:
    """``python -m airflow_batch_infer.runtimes.local prepare``: build the server environment."""
    parser = argparse.ArgumentParser(prog="python -m airflow_batch_infer.runtimes.local")
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="build the Triton server environment (idempotent)")
    prepare.add_argument(
        "--server-env",
        help="where (default: [batch_infer] triton_server_env, else <home>/triton-server-env)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "prepare":
        env = LocalTritonRuntime(server_env=args.server_env).ensure_server_env()
        print(f"Triton server environment: {env.path}")
        print(f"  tritonserver: {env.tritonserver}")
        print(f"  python: {env.python} (numpy {env.numpy_version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
