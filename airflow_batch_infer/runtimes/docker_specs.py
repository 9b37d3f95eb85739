"""The docker runtime's options (:class:`DockerOptions`), its container as a pure function
(:func:`build_container_spec`), and a listed container read back as a server (:func:`listed_server`).

NVIDIA's image, GPUs, shared memory and ulimits, the model repository (a read-only bind mount, or S3 read
by tritonserver itself), ports published on loopback by default or a network to join, and labels naming
the DAG run and the lease.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from airflow_batch_infer.runtimes.base import ServerInfo
from airflow_batch_infer.runtimes.container_keeper import LEASE_FILE
from airflow_batch_infer.runtimes.containers import (
    PORTS,
    ULIMITS,
    ContainerOptions,
    TritonContainer,
    gpu_count,
)
from airflow_batch_infer.runtimes.labels import SERVER_ID_KEY, ServerOwner, lease_from_labels

DEFAULT_DOCKER_URL = "unix://var/run/docker.sock"


@dataclass(kw_only=True)
class DockerOptions(ContainerOptions):
    """A server's container on a Docker host: :class:`~.containers.ContainerOptions` and these.

    A repository path is a folder on the Docker host, mounted read-only at ``/models``. With a
    ``lease_timeout``, the container's keeper (its first process) stops the server when its lease file,
    which each renewal copies in, is older than that (:mod:`~airflow_batch_infer.runtimes.container_keeper`);
    the reaper also stops it by the file's age, and once its run is no longer queued or running.

    :param gpus: number of GPUs, ``"all"``, a list of device ids, or 0 for a CPU-only server.
    :param shm_size: shared memory of the container (Python backend tensors, ensembles), e.g. ``"2g"``.
    :param network: a Docker network to join (e.g. the compose stack's); workers then reach the server by
        its container name there and no port is published.
    :param host_ip: address the published ports bind on the Docker host: loopback by default, so that only
        the host's own workers reach the server; a private address (never ``0.0.0.0`` on a shared network)
        for workers elsewhere, or better a ``network`` shared with the workers.
    :param host_ports: fixed host ports (``{"http": 8000, "grpc": 8001, "metrics": 8002}``); free ones
        chosen by Docker when ``None``.
    :param volumes: more binds, ``host_path:container_path[:ro]``.
    """

    runtime: ClassVar[str] = "docker"
    mounts_repository: ClassVar[bool] = True
    keeper_file: ClassVar[str | None] = LEASE_FILE

    shm_size: str = "1g"
    network: str | None = None
    host_ip: str = "127.0.0.1"
    host_ports: dict[str, int] | None = None
    volumes: list[str] = field(default_factory=list)


@dataclass
class ContainerSpec:
    """What :func:`build_container_spec` returns.

    :param create: keyword arguments of ``APIClient.create_container`` (less ``host_config``).
    :param host_config: keyword arguments of ``APIClient.create_host_config``.
    """

    create: dict[str, Any]
    host_config: dict[str, Any] = field(default_factory=dict)


def build_container_spec(options: DockerOptions, container: TritonContainer) -> ContainerSpec:
    """The docker container of ``container``: a pure function.

    :param options: the runtime's options.
    :param container: the server's container (:meth:`~.containers.ContainerOptions.describe`).
    """
    from docker.types import DeviceRequest, Ulimit

    binds = list(options.volumes or [])
    if container.mount:
        binds.insert(0, f"{container.mount}:{container.repository}:ro")
    host_config: dict[str, Any] = {
        "shm_size": options.shm_size,
        "ulimits": [Ulimit(name=name, soft=soft, hard=hard) for name, (soft, hard) in ULIMITS.items()],
        "binds": binds,
        "auto_remove": False,  # an exited server keeps its log until stop() removes it
    }
    gpus = options.gpus
    count = gpu_count(gpus)
    if count != 0:
        request: dict[str, Any] = {"driver": "nvidia", "capabilities": [["gpu"]]}
        if isinstance(gpus, (list, tuple)):
            request["device_ids"] = [str(g) for g in gpus]
        else:
            request["count"] = -1 if count is None else count
        host_config["device_requests"] = [DeviceRequest(**request)]
    if options.network:
        host_config["network_mode"] = options.network
    else:
        fixed = options.host_ports or {}
        host_config["port_bindings"] = {
            port: (options.host_ip, fixed.get(key)) for key, port in PORTS.items()
        }
    create = {
        "image": options.image,
        "name": container.server_id,
        "command": container.command,
        "labels": container.labels,
        "environment": container.environment,
        "ports": list(PORTS.values()),
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
        "docker",
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
    for key, port in PORTS.items():
        bindings = published.get(f"{port}/tcp") or []
        ports[key] = int(bindings[0]["HostPort"]) if bindings and bindings[0].get("HostPort") else 0
    return ports
