"""The docker runtime's container, as a pure function (:func:`build_container_spec`), and a listed container
read back as a server (:func:`listed_server`).

NVIDIA's image, GPUs, shared memory and ulimits, the model repository (a read-only bind mount, or S3 read
by tritonserver itself), ports published on loopback by default or a network to join, and labels naming
the DAG run and the lease.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from airflow_batch_infer.runtimes.base import ServerInfo
from airflow_batch_infer.runtimes.container_keeper import LEASE_FILE, keeper_command, keeper_environment
from airflow_batch_infer.runtimes.containers import (
    CONTAINER_MODEL_REPOSITORY,
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    gpu_count,
    is_remote_repository,
    triton_s3_path,
    tritonserver_command,
)
from airflow_batch_infer.runtimes.labels import SERVER_ID_KEY, ServerOwner, lease_from_labels, server_labels

DEFAULT_DOCKER_URL = "unix://var/run/docker.sock"
#: NVIDIA's recommended limits for Triton containers (pinned memory, deep stacks in backends).
ULIMITS = {"memlock": (-1, -1), "stack": (67108864, 67108864)}
_PORTS = {"http": HTTP_PORT, "grpc": GRPC_PORT, "metrics": METRICS_PORT}


@dataclass
class ContainerSpec:
    """What :func:`build_container_spec` returns.

    :param create: keyword arguments of ``APIClient.create_container`` (less ``host_config``).
    :param host_config: keyword arguments of ``APIClient.create_host_config``.
    """

    create: dict[str, Any]
    host_config: dict[str, Any] = field(default_factory=dict)


def build_container_spec(
    *,
    server_id: str,
    image: str,
    model_repository: str,
    models: list[str] | None,
    owner: ServerOwner | None = None,
    gpus: int | str | list[str] = 1,
    shm_size: str = "1g",
    network: str | None = None,
    host_ip: str = "127.0.0.1",
    host_ports: dict[str, int] | None = None,
    environment: dict[str, str] | None = None,
    volumes: list[str] | None = None,
    extra_args: list[str] | None = None,
    log_verbose: int = 0,
    s3_endpoint_url: str | None = None,
    lease_timeout: float = 0,
) -> ContainerSpec:
    """The container that serves ``models``: a pure function of the runtime's options.

    :param server_id: the server's id: container name, ``--id`` and a label.
    :param image: the tritonserver image.
    :param model_repository: a path on the Docker host (mounted read-only at ``/models``) or ``s3://...``.
    :param models: models to load (all in the repository when ``None``).
    :param owner: the task instance that starts it (labels).
    :param gpus: number of GPUs, ``"all"``, a list of device ids, or 0 for none.
    :param shm_size: shared memory of the container (Python backend tensors, ensembles), e.g. ``"2g"``.
    :param network: a Docker network to join; the server is then reached by its name there and its
        ports are not published.
    :param host_ip: address the published ports bind on the Docker host: loopback by default, so that only
        the host's own workers reach the server; a private address (never ``0.0.0.0`` on a shared network)
        for workers elsewhere, or better a ``network`` shared with the workers.
    :param host_ports: fixed host ports (``{"http": 8000, "grpc": 8001, "metrics": 8002}``); free ones
        chosen by Docker when ``None``.
    :param environment: environment variables of the server.
    :param volumes: more binds, ``host_path:container_path[:ro]``.
    :param extra_args: more tritonserver flags.
    :param log_verbose: Triton's ``--log-verbose`` level.
    :param s3_endpoint_url: endpoint of an S3-compatible store holding the repository.
    :param lease_timeout: seconds without a renewal of the container's lease file after which its keeper
        stops the server (:mod:`~airflow_batch_infer.runtimes.container_keeper`); also recorded as the
        ``airflow-batch-infer/lease-timeout`` label for the reaper (0: no lease).
    """
    from docker.types import DeviceRequest, Ulimit

    binds: list[str] = list(volumes or [])
    if is_remote_repository(model_repository):
        repository = (
            triton_s3_path(model_repository, s3_endpoint_url)
            if model_repository.startswith("s3://")
            else model_repository
        )
    else:
        repository = CONTAINER_MODEL_REPOSITORY
        binds.insert(0, f"{model_repository}:{CONTAINER_MODEL_REPOSITORY}:ro")

    host_config: dict[str, Any] = {
        "shm_size": shm_size,
        "ulimits": [Ulimit(name=name, soft=soft, hard=hard) for name, (soft, hard) in ULIMITS.items()],
        "binds": binds,
        "auto_remove": False,  # an exited server keeps its log until stop() removes it
    }
    count = gpu_count(gpus)
    if count != 0:
        request: dict[str, Any] = {"driver": "nvidia", "capabilities": [["gpu"]]}
        if isinstance(gpus, (list, tuple)):
            request["device_ids"] = [str(g) for g in gpus]
        else:
            request["count"] = -1 if count is None else count
        host_config["device_requests"] = [DeviceRequest(**request)]
    if network:
        host_config["network_mode"] = network
    else:
        fixed = host_ports or {}
        host_config["port_bindings"] = {port: (host_ip, fixed.get(key)) for key, port in _PORTS.items()}

    command = tritonserver_command(
        repository, server_id, models, log_verbose=log_verbose, extra_args=extra_args
    )
    environment = dict(environment or {})
    if lease_timeout and lease_timeout > 0:  # the container stops itself when its run stops renewing
        command = keeper_command(command)
        environment.update(keeper_environment(lease_timeout, LEASE_FILE))
    create = {
        "image": image,
        "name": server_id,
        "command": command,
        "labels": server_labels(server_id, owner, lease_timeout),
        "environment": environment,
        "ports": list(_PORTS.values()),
        "detach": True,
        "stop_signal": "SIGTERM",
    }
    return ContainerSpec(create=create, host_config=host_config)


def docker_host(docker_url: str) -> str:
    """The host of a ``tcp://`` or ``https://`` Docker URL; ``127.0.0.1`` for a local socket."""
    if docker_url.startswith(("tcp://", "http://", "https://")):
        return urlsplit(docker_url.replace("tcp://", "http://", 1)).hostname or "127.0.0.1"
    return "127.0.0.1"


def listed_server(item: dict[str, Any], docker_url: str) -> ServerInfo:
    """A server found in the Engine's container list (``GET /containers/json``), without its endpoint.

    Its lease counts from the container's creation until the runtime reads a renewal.
    """
    labels = item.get("Labels") or {}
    owner = ServerOwner.from_labels(labels)
    name = (item.get("Names") or [""])[0].lstrip("/")
    return ServerInfo(
        runtime="docker",
        grpc_url="",
        http_url="",
        metrics_url="",
        handle={
            "server_id": labels.get(SERVER_ID_KEY, name),
            "container_id": item["Id"],
            "container_name": name,
            "docker_url": docker_url,
            "owner": owner.to_dict() if owner else None,
            "started_at": float(item.get("Created") or 0),
            "state": item.get("State"),
            "lease_renewed_at": float(item.get("Created") or 0),
            **lease_from_labels(labels),
        },
    )


def published_ports(details: dict[str, Any]) -> dict[str, int]:
    """The host ports (``http``, ``grpc``, ``metrics``; 0 where none yet) of an inspected container."""
    published = details.get("NetworkSettings", {}).get("Ports") or {}
    ports = {}
    for key, port in _PORTS.items():
        bindings = published.get(f"{port}/tcp") or []
        ports[key] = int(bindings[0]["HostPort"]) if bindings and bindings[0].get("HostPort") else 0
    return ports
