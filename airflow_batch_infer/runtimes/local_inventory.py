"""The local servers of a ``work_root`` on this host, found on the host itself, not in Airflow's database.

Two sources, so that neither can hide a server: the server folders (each one's ``server.json``, written at
launch, holds its handle and owner) and the processes (``--id=abi-...`` with a model repository under
``work_root``), so that a server whose folder was removed is found too.
"""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

from airflow_batch_infer.runtimes.base import ServerInfo
from airflow_batch_infer.runtimes.lease import lease_path, read_lease
from airflow_batch_infer.runtimes.local_processes import ServerProcess, all_server_ids

#: Written in each server's folder at launch: its handle and owner.
SERVER_RECORD = "server.json"


def write_record(workdir: Path, info: ServerInfo) -> None:
    """Write the server's handle and owner to ``server.json`` in its folder (a new inode, atomically)."""
    path = workdir / SERVER_RECORD
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(info.to_dict(), indent=1))
    tmp.replace(path)


def find_servers(work_root: Path) -> list[ServerInfo]:
    """Every server under ``work_root`` on this host whose processes run or whose folder was not cleaned up.

    Each handle gets ``state`` (``running`` or ``exited``), ``keeper`` (``alive`` or ``gone``: its
    supervisor), ``pids`` and, where it has a lease, ``lease_age`` (seconds since the last renewal) and
    ``lease_timeout``.

    :param work_root: the runtime's folder of server folders.
    """
    if not work_root.is_dir():
        return []
    processes = all_server_ids(work_root)
    servers = []
    seen = set()
    for record in sorted(work_root.glob(f"abi-*/{SERVER_RECORD}")):
        try:
            info = ServerInfo.from_dict(json.loads(record.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if info.handle.get("hostname") not in (None, socket.gethostname()):
            continue
        server_id = info.handle.get("server_id")
        seen.add(server_id)
        procs = processes.get(server_id, [])
        if procs or (record.parent / "models").exists():
            servers.append(describe(info, procs))
    for server_id, procs in processes.items():
        if server_id not in seen:
            servers.append(describe(info_from_processes(server_id, procs), procs))
    return servers


def describe(info: ServerInfo, procs: list[ServerProcess]) -> ServerInfo:
    """Add what the host says of the server to its handle: state, keeper, pids, lease age."""
    h = info.handle
    h["state"] = "running" if procs else "exited"
    h["keeper"] = "alive" if any(p.role == "supervisor" for p in procs) else "gone"
    h["pids"] = sorted(p.pid for p in procs)
    path = lease_path(h)
    lease = read_lease(path) if path is not None else None
    if lease is not None:
        h["lease_age"], h["lease_timeout"] = lease
    return info


def info_from_processes(server_id: str, procs: list[ServerProcess]) -> ServerInfo:
    """What a server's command line tells of it, for a server whose folder is gone."""
    args = " ".join(p.cmdline for p in procs).split(" ")

    def flag(name: str) -> str | None:
        return next((a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")), None)

    http, grpc, metrics = flag("http-port"), flag("grpc-port"), flag("metrics-port")
    repo = flag("model-repository")
    return ServerInfo(
        runtime="local",
        grpc_url=f"127.0.0.1:{grpc}" if grpc else "",
        http_url=f"http://127.0.0.1:{http}" if http else "",
        metrics_url=f"http://127.0.0.1:{metrics}/metrics" if metrics else "",
        handle={
            "pid": next((p.pid for p in procs if p.role == "supervisor"), procs[0].pid),
            "server_id": server_id,
            "workdir": str(Path(repo).parent) if repo else None,
            "shm_prefix": f"{server_id}-shm-",
            "hostname": socket.gethostname(),
            "owner": None,
            "started_at": None,
        },
    )
