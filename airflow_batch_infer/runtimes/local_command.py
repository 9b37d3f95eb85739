"""The command lines of a local server: ``supervisor.py ... -- tritonserver ...``, and its handle."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

from airflow_batch_infer.runtimes.access import new_key, restricted_flags
from airflow_batch_infer.runtimes.base import ServerInfo
from airflow_batch_infer.runtimes.labels import ServerOwner
from airflow_batch_infer.runtimes.lease import lease_path, write_lease
from airflow_batch_infer.runtimes.local_env import ServerEnv
from airflow_batch_infer.runtimes.local_processes import ID_FLAG

SUPERVISOR = Path(__file__).resolve().parent / "supervisor.py"
READY_FILE = "ready"  # written in the server's folder once it was seen ready: the supervisor may restart it
#: Seconds ``tritonserver`` waits for in-flight requests after SIGTERM. Teardown comes after persist, so
#: nothing in flight is still wanted; the supervisor SIGKILLs it after its grace anyway.
EXIT_TIMEOUT_SECS = 1


def server_info(
    server_id: str,
    workdir: Path,
    ports: list[int],
    owner: ServerOwner | None,
    models: list[str] | None,
    lease_timeout: float,
) -> ServerInfo:
    """The handle of a new local server: its id, folder, ports, owner, models and lease.

    :param server_id: the new server's id.
    :param workdir: its folder.
    :param ports: HTTP, gRPC and metrics ports.
    :param owner: the task instance that starts it.
    :param models: the models asked for (``None``: all in the repository).
    :param lease_timeout: seconds without a renewal before the server is stopped (0: no lease).
    """
    http, grpc, metrics = ports
    handle = {
        "pid": None,
        "server_id": server_id,
        "workdir": str(workdir),
        "log_path": str(workdir / "server.log"),
        "shm_prefix": f"{server_id}-shm-",
        "hostname": socket.gethostname(),
        "http_port": http,
        "grpc_port": grpc,
        "metrics_port": metrics,
        "owner": owner.to_dict() if owner else None,
        "models": list(models) if models else None,
        "lease_timeout": lease_timeout,
        "started_at": time.time(),
    }
    return ServerInfo.at("local", "127.0.0.1", {"http": http, "grpc": grpc, "metrics": metrics}, handle)


def server_command(env: ServerEnv, info: ServerInfo, repo: Path, options: Any) -> list[str]:
    """The supervisor's command line with the server's after ``--``; writes the lease file first.

    :param env: the server environment.
    :param info: the server's handle (:func:`server_info`).
    :param repo: the materialised model repository.
    :param options: the runtime (``log_verbose``, ``grpc_tls``, ``max_restarts``, ``lease_timeout``,
        ``stop_grace_period``, ``auto_complete_config``, ``restricted_api``).
    """
    h = info.handle
    workdir = Path(h["workdir"])
    cmd = [
        str(env.tritonserver),
        f"--model-repository={repo}",
        f"--backend-directory={env.runtime_dir / 'backends'}",
        f"--cache-directory={env.runtime_dir / 'caches'}",
        f"{ID_FLAG}{h['server_id']}",
        "--http-address=127.0.0.1",
        f"--http-port={h['http_port']}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={h['grpc_port']}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={h['metrics_port']}",
        f"--exit-timeout-secs={EXIT_TIMEOUT_SECS}",
        "--pinned-memory-pool-byte-size=0",
        "--allow-gpu-metrics=false",
        f"--backend-config=python,shm-region-prefix-name={h['shm_prefix']}",
        "--strict-readiness=true",
        f"--log-verbose={options.log_verbose}",
    ]
    if options.restricted_api:
        h["api_key_file"] = str(new_key(workdir))
        cmd += restricted_flags(Path(h["api_key_file"]).read_text().strip())
    if not options.auto_complete_config:
        cmd.append("--disable-auto-complete-config")  # no extra stub per model: about 1.3 s of each start
    if options.grpc_tls:
        cmd += [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={options.grpc_tls['server_cert']}",
            f"--grpc-server-key={options.grpc_tls['server_key']}",
        ]
        if options.grpc_tls.get("root_cert"):
            cmd += [f"--grpc-root-cert={options.grpc_tls['root_cert']}", "--grpc-use-ssl-mutual=true"]
    lease = lease_path(h)
    if options.lease_timeout > 0 and lease is not None:
        write_lease(lease, options.lease_timeout)
    # Always under a supervisor: the keeper the server dies with, and the one that checks the lease.
    cmd = [
        sys.executable,
        str(SUPERVISOR),
        f"--server-id={h['server_id']}",
        f"--ready-url={info.http_url}/v2/health/ready",
        f"--ready-file={workdir / READY_FILE}",
        f"--shm-prefix={h['shm_prefix']}",
        f"--max-restarts={options.max_restarts}",
        f"--lease-file={lease if options.lease_timeout > 0 else ''}",
        f"--lease-timeout={options.lease_timeout:g}",
        f"--stop-grace={options.stop_grace_period:g}",
        f"--workdir={workdir}",
        "--",
        *cmd,
    ]
    return cmd
