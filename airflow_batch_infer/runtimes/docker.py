"""The docker runtime: NVIDIA's ``tritonserver`` image as a container on a Docker host with GPUs.

The container is created through the docker provider's
:class:`~airflow.providers.docker.hooks.docker.DockerHook` (the docker SDK's API client), never through a
shell string. :func:`build_container_spec` (in :mod:`.docker_specs`, re-exported here) is the whole
container, as a pure function. Needs the ``docker`` extra (``apache-airflow-providers-docker``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow_batch_infer.runtimes.base import ServerInfo, ServerStartError, TritonRuntime
from airflow_batch_infer.runtimes.container_keeper import LEASE_FILE, lease_archive, stat_mtime
from airflow_batch_infer.runtimes.containers import PORTS, credentials_archive, require_provider, s3_access
from airflow_batch_infer.runtimes.docker_specs import (
    DEFAULT_DOCKER_URL,
    ContainerSpec,
    DockerOptions,
    build_container_spec,
    docker_host,
    listed_server,
    published_ports,
)
from airflow_batch_infer.runtimes.labels import (
    MANAGED_BY,
    MANAGED_BY_KEY,
    SERVER_ID_KEY,
    ServerOwner,
    new_server_id,
)

if TYPE_CHECKING:
    from docker import APIClient

__all__ = ["DockerOptions", "DockerTritonRuntime", "build_container_spec"]

log = logging.getLogger(__name__)


class DockerTritonRuntime(TritonRuntime):
    """Runs NVIDIA's ``tritonserver`` image as a container on a Docker host with NVIDIA GPUs.

    :param docker_url: the Docker Engine (``unix://var/run/docker.sock``, ``tcp://gpu-host:2376``).
    :param docker_conn_id: a ``docker`` connection to log in to a private registry (NGC images are public).
    :param advertise_host: host name the workers use for published ports; by default the host of a
        ``tcp://`` ``docker_url``, else ``127.0.0.1``.
    :param aws_conn_id: ``aws`` connection whose keys (and ``endpoint_url``) the server uses for ``s3://``.
        The keys go into a credentials file copied into the container before it starts (removed with the
        container), never into its environment; without keys, the host's instance role serves.
    :param pull: ``missing`` (pull when the host lacks the image), ``always`` or ``never``.
    :param startup_timeout: seconds from launch until the models must be ready (pulling not included).
    :param api_timeout: seconds for a call to the Docker Engine.
    :param tls_ca_cert: CA certificate file for a TLS Docker Engine (with the two below).
    :param tls_client_cert: client certificate file.
    :param tls_client_key: client key file.
    :param options: the container's options, :class:`~airflow_batch_infer.runtimes.docker_specs.DockerOptions`
        (``image``, ``gpus``, ``shm_size``, ``network``, ``host_ip``, ``host_ports``, ``model_repository``,
        ``environment``, ``volumes``, ``extra_args``, ``log_verbose``, ``stop_grace_period``,
        ``lease_timeout``).
    """

    name = "docker"

    def __init__(
        self,
        docker_url: str = DEFAULT_DOCKER_URL,
        docker_conn_id: str | None = None,
        advertise_host: str | None = None,
        aws_conn_id: str | None = None,
        pull: str = "missing",
        startup_timeout: float = 900,
        api_timeout: int = 120,
        tls_ca_cert: str | None = None,
        tls_client_cert: str | None = None,
        tls_client_key: str | None = None,
        **options: Any,
    ) -> None:
        require_provider("airflow.providers.docker", "docker")
        if pull not in ("missing", "always", "never"):
            raise ValueError(f"pull must be 'missing', 'always' or 'never', not {pull!r}.")
        self.options = DockerOptions(**options)
        self.lease_timeout = self.options.lease_timeout
        self.docker_url = docker_url
        self.docker_conn_id = docker_conn_id
        self.advertise_host = advertise_host
        self.aws_conn_id = aws_conn_id
        self.pull = pull
        self.startup_timeout = float(startup_timeout)
        self.api_timeout = int(api_timeout)
        self.tls = (tls_ca_cert, tls_client_cert, tls_client_key)

    @cached_property
    def client(self) -> APIClient:
        """The docker SDK's API client, from the docker provider's hook."""
        from airflow.providers.docker.hooks.docker import DockerHook

        tls = DockerHook.construct_tls_config(*self.tls) if all(self.tls) else False
        hook = DockerHook(
            docker_conn_id=self.docker_conn_id, base_url=self.docker_url, tls=tls, timeout=self.api_timeout
        )
        return hook.get_conn()

    # ------------------------------------------------------------------ launch

    def container_spec(
        self, server_id: str, model_repository: str, models: list[str] | None, owner: ServerOwner | None
    ) -> ContainerSpec:
        """:func:`build_container_spec` with this runtime's options (S3 keys read from ``aws_conn_id``)."""
        options = self.options
        if options.repository_for(model_repository).startswith("s3://") and self.aws_conn_id:
            access = s3_access(self.aws_conn_id)
            options = replace(
                options,
                environment={**access.environment, **options.environment},
                s3_endpoint_url=access.endpoint_url or options.s3_endpoint_url,
            )
        return build_container_spec(options, options.describe(server_id, model_repository, models, owner))

    def launch(
        self, model_repository: str, models: list[str] | None = None, owner: ServerOwner | None = None
    ) -> ServerInfo:
        """Create and start the container; return its endpoint without waiting for readiness."""
        from docker.errors import DockerException

        server_id = new_server_id()
        spec = self.container_spec(server_id, str(model_repository), models, owner)
        client = self.client
        self._ensure_image(client)
        container_id = None
        try:
            host_config = client.create_host_config(**spec.host_config)
            container_id = client.create_container(**spec.create, host_config=host_config)["Id"]
            self._copy_credentials(client, container_id, str(model_repository))
            client.start(container_id)
            details = client.inspect_container(container_id)
        except DockerException as exc:
            if container_id:
                with contextlib.suppress(DockerException):
                    client.remove_container(container_id, force=True)
            hint = ""
            if "nvidia" in str(exc).lower() or "gpu" in str(exc).lower():
                hint = (
                    " The Docker host needs NVIDIA GPUs and the NVIDIA Container Toolkit "
                    "(`nvidia-ctk runtime configure --runtime=docker`); set gpus=0 for a CPU-only server."
                )
            raise ServerStartError(f"Docker could not start Triton server {server_id}: {exc}.{hint}") from exc
        info = self._server_info(details, owner)
        log.info(
            "Triton container %s (%s) started from %s; gRPC %s",
            server_id,
            container_id[:12],
            self.options.image,
            info.grpc_url,
        )
        return info

    def _copy_credentials(self, client: APIClient, container_id: str, model_repository: str) -> None:
        """Copy the S3 credentials file into the created container (never into its environment)."""
        if not (self.options.repository_for(model_repository).startswith("s3://") and self.aws_conn_id):
            return
        access = s3_access(self.aws_conn_id)
        if access.credentials:
            client.put_archive(container_id, "/", credentials_archive(access.credentials))

    def _ensure_image(self, client: APIClient) -> None:
        from docker.errors import ImageNotFound
        from docker.utils import parse_repository_tag

        if self.pull == "never":
            return
        if self.pull == "missing":
            try:
                client.inspect_image(self.options.image)
                return
            except ImageNotFound:
                pass
        repository, tag = parse_repository_tag(self.options.image)
        started = time.monotonic()
        log.info("Pulling %s (Triton images are large: minutes on a first pull).", self.options.image)
        for line in client.pull(repository, tag=tag or "latest", stream=True, decode=True):
            if isinstance(line, dict) and line.get("error"):
                raise ServerStartError(f"Docker could not pull {self.options.image}: {line['error']}")
        log.info("Pulled %s in %.0f s.", self.options.image, time.monotonic() - started)

    def _server_info(self, details: dict[str, Any], owner: ServerOwner | None) -> ServerInfo:
        name = details.get("Name", "").lstrip("/")
        labels = details.get("Config", {}).get("Labels") or {}
        owner = owner or ServerOwner.from_labels(labels)
        server_id = labels.get(SERVER_ID_KEY, name)
        network = self.options.network
        host = name if network else (self.advertise_host or docker_host(self.docker_url))
        handle = {
            "server_id": server_id,
            "container_id": details.get("Id"),
            "container_name": name,
            "image": details.get("Config", {}).get("Image", self.options.image),
            "docker_url": self.docker_url,
            "owner": owner.to_dict() if owner else None,
            "started_at": time.time(),
        }
        return ServerInfo.at(self.name, host, PORTS if network else published_ports(details), handle)

    def refresh(self, info: ServerInfo) -> ServerInfo:
        """``info`` with the container's endpoint, for a server found by :meth:`list_servers` (no URLs)."""
        if info.http_url:
            return info
        details = self._inspect(info)
        if details is None:
            return info
        fresh = self._server_info(details, ServerOwner.from_dict(info.handle.get("owner")))
        fresh.handle = {**info.handle, **{k: v for k, v in fresh.handle.items() if k != "started_at"}}
        return fresh

    # ------------------------------------------------------------------ stop and inspect

    def _inspect(self, info: ServerInfo) -> dict[str, Any] | None:
        from docker.errors import NotFound

        try:
            return self.client.inspect_container(info.handle["container_id"])
        except NotFound:
            return None

    def stop(self, info: ServerInfo) -> bool:
        """Stop (SIGTERM, then SIGKILL after ``stop_grace_period``) and remove the container.

        :returns: ``False`` when it was already gone or had exited (it is removed all the same).
        """
        from docker.errors import NotFound

        details = self._inspect(info)
        name = info.handle.get("server_id")
        if details is None:
            log.info("Triton container %s was already gone.", name)
            return False
        running = bool(details.get("State", {}).get("Running"))
        client = self.client
        with contextlib.suppress(NotFound):
            if running:
                client.stop(info.handle["container_id"], timeout=int(self.options.stop_grace_period))
            client.remove_container(info.handle["container_id"], force=True)
        if running:
            log.info("Stopped and removed Triton container %s.", name)
        else:
            log.info("Triton container %s had already exited; removed it.", name)
        return running

    def renew_lease(self, info: ServerInfo) -> bool:
        """Renew the container's lease: copy in its lease file, dated now (:mod:`.container_keeper`)."""
        from docker.errors import NotFound

        if not self.lease_timeout:
            return False
        try:
            self.client.put_archive(info.handle["container_id"], "/", lease_archive())
        except NotFound:
            log.warning(
                "Triton container %s is gone: its lease cannot be renewed.", info.handle.get("server_id")
            )
            return False
        return True

    def _lease_renewed_at(self, container_id: str) -> dict[str, float]:
        """When a running container's lease was last renewed (``{}`` before its first renewal)."""
        from docker.errors import DockerException

        try:
            stream, stat = self.client.get_archive(container_id, LEASE_FILE)
            for _ in stream:  # the archive itself is not needed
                pass
        except DockerException:
            return {}
        renewed = stat_mtime(stat)
        return {"lease_renewed_at": renewed} if renewed else {}

    def is_running(self, info: ServerInfo) -> bool:
        """Whether the container exists and runs."""
        details = self._inspect(info)
        return bool(details and details.get("State", {}).get("Running"))

    def failure_reason(self, info: ServerInfo) -> str | None:
        """Why the container will never serve: removed, or exited (with its exit code)."""
        details = self._inspect(info)
        if details is None:
            return "its container is gone"
        state = details.get("State", {})
        if state.get("Running"):
            return None
        if state.get("Status") == "created":
            return None
        oom = " (out of memory)" if state.get("OOMKilled") else ""
        return (
            f"its container exited with code {state.get('ExitCode')}{oom}: {state.get('Error') or ''}".rstrip(
                ": "
            )
        )

    def log_tail(self, info: ServerInfo, lines: int = 40) -> str:
        """The container's last ``lines`` lines of stdout and stderr."""
        from docker.errors import NotFound

        try:
            data = self.client.logs(info.handle["container_id"], stdout=True, stderr=True, tail=lines)
        except NotFound:
            return ""
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else str(data)
        return "\n".join(text.splitlines()[-lines:])

    def list_servers(self) -> list[ServerInfo]:
        """Containers labelled as ours on this Docker host, running or exited."""
        found = self.client.containers(all=True, filters={"label": [f"{MANAGED_BY_KEY}={MANAGED_BY}"]})
        servers = []
        for item in found:
            info = listed_server(item, self.docker_url)
            if item.get("State") == "running":
                info.handle.update(self._lease_renewed_at(item["Id"]))
            servers.append(info)
        return servers
