"""What the container runtimes (docker, kubernetes, ecs) share: NVIDIA's image, its ports, the command line,
S3 paths, and one description of a server's container.

Each runtime's options are a :class:`ContainerOptions` (image, GPUs, repository, environment, flags, lease)
with its platform's own added (``DockerOptions``, ``PodOptions``, ``TaskOptions``). For each server,
:meth:`ContainerOptions.describe` gives a :class:`TritonContainer`: its id, command line, environment,
labels and where it reads its models. The runtime's ``*_specs`` module translates that into its
platform's objects (a docker container, a Pod, an ECS task).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import urlsplit

from airflow_batch_infer.runtimes.access import restricted_flags
from airflow_batch_infer.runtimes.base import DEFAULT_LEASE_TIMEOUT
from airflow_batch_infer.runtimes.container_keeper import keeper_command, keeper_environment
from airflow_batch_infer.runtimes.labels import (
    LEASE_RENEWED_KEY,
    LEASE_TIMEOUT_KEY,
    ServerOwner,
    server_labels,
)

#: NVIDIA's Triton image, pinned: its ``-py3`` image carries the native onnxruntime, TensorRT, PyTorch and
#: Python backends; its ``-trtllm-python-py3`` variant the TensorRT-LLM backend. One tag for both, the
#: release the TensorRT-LLM templates in ``triton_models/llm`` target (TensorRT-LLM 1.0.0), so that an
#: engine built in that image is served by the same version. Check the host's NVIDIA driver against the
#: release notes of the tag before you move it.
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-py3"
#: The same release with the TensorRT-LLM backend (and the Python backend for the ensemble's tokenizers).
TRITON_TRTLLM_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3"

HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002
#: The server's ports by name, as every runtime publishes them.
PORTS = {"http": HTTP_PORT, "grpc": GRPC_PORT, "metrics": METRICS_PORT}
#: NVIDIA's recommended limits for Triton containers (pinned memory, deep stacks in backends): soft, hard.
ULIMITS = {"memlock": (-1, -1), "stack": (67108864, 67108864)}
#: Where a model repository on a volume is mounted in the container.
CONTAINER_MODEL_REPOSITORY = "/models"
#: Cloud storage that tritonserver reads itself (``--model-repository=s3://...``).
REMOTE_SCHEMES = ("s3://", "gs://", "as://")


def is_remote_repository(path: str) -> bool:
    """Whether ``path`` is cloud storage that tritonserver reads itself (not a path to mount)."""
    return str(path).startswith(REMOTE_SCHEMES)


def triton_s3_path(uri: str, endpoint_url: str | None = None) -> str:
    """``s3://bucket/prefix`` in the form tritonserver reads, also from an S3-compatible store.

    Triton names a custom endpoint inside the path: ``s3://host:port/bucket/prefix`` over HTTP, and
    ``s3://https://host:port/bucket/prefix`` over HTTPS.

    :param uri: ``s3://bucket/prefix``.
    :param endpoint_url: the store's endpoint (``http://minio:9000``); AWS S3 itself when ``None``.
    """
    if not uri.startswith("s3://"):
        raise ValueError(f"Not an s3:// URI: {uri!r}")
    if not endpoint_url:
        return uri
    endpoint = urlsplit(endpoint_url)
    if not endpoint.hostname:
        raise ValueError(f"Endpoint URL {endpoint_url!r} has no host.")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    scheme = "https://" if endpoint.scheme == "https" else ""
    return f"s3://{scheme}{endpoint.hostname}:{port}/{uri[len('s3://') :].lstrip('/')}"


def tritonserver_command(
    model_repository: str,
    server_id: str,
    models: list[str] | None,
    *,
    log_verbose: int = 0,
    extra_args: list[str] | None = None,
    close_restricted_apis: bool = True,
) -> list[str]:
    """The ``tritonserver`` command line of a containerised server.

    ``--id`` is the server id (``GET /v2`` answers it, so a wait never mistakes another server for this
    one); with ``models`` only those are loaded (``--model-control-mode=explicit``); strict readiness makes
    ``/v2/health/ready`` wait for every model. Model control and shared memory are closed to every client
    (a restricted-API key that nobody is given): the server loads its models at start, and its clients, in
    other containers or on other hosts, never share its memory; so whoever reaches its port can infer but
    never load a model (which runs code) or map a region.

    :param model_repository: the repository as the container sees it (a path or ``s3://...``).
    :param server_id: the server's unique id.
    :param models: models to load; all in the repository when ``None``.
    :param log_verbose: Triton's ``--log-verbose`` level.
    :param extra_args: more tritonserver flags, appended as they are.
    :param close_restricted_apis: close model control and shared memory (see above).
    """
    command = [
        "tritonserver",
        f"--model-repository={model_repository}",
        f"--id={server_id}",
        f"--http-port={HTTP_PORT}",
        f"--grpc-port={GRPC_PORT}",
        f"--metrics-port={METRICS_PORT}",
        "--strict-readiness=true",
        "--exit-timeout-secs=30",
        f"--log-verbose={int(log_verbose)}",
    ]
    if models:
        command.append("--model-control-mode=explicit")
        command.extend(f"--load-model={model}" for model in dict.fromkeys(models))
    if close_restricted_apis:
        command.extend(restricted_flags(secrets.token_urlsafe(32)))
    command.extend(extra_args or [])
    return command


def gpu_count(gpus: int | str | list[str]) -> int | None:
    """Number of GPUs asked for: an int, ``"all"`` (``None``: every GPU), or a list of device ids."""
    if isinstance(gpus, (list, tuple)):
        return len(gpus)
    if isinstance(gpus, str):
        if gpus.lower() == "all":
            return None
        return int(gpus)
    return int(gpus)


@dataclass(kw_only=True)
class ContainerOptions:
    """The options every container runtime takes; each runtime's own class adds its platform's.

    :param image: the tritonserver image; :data:`TRITON_TRTLLM_IMAGE` for TensorRT-LLM models.
    :param gpus: GPUs of the server (0 for a CPU-only server).
    :param model_repository: where the server reads its models when not the path the DAG names:
        ``s3://bucket/prefix`` (``gs://``, ``as://``), or a path (on the Docker host for docker; inside the
        container, on a volume, for kubernetes and ecs).
    :param s3_endpoint_url: endpoint of an S3-compatible store holding the repository (AWS S3 when ``None``).
    :param environment: more environment variables of the server.
    :param extra_args: more tritonserver flags, appended as they are.
    :param log_verbose: Triton's ``--log-verbose`` level.
    :param stop_grace_period: seconds between SIGTERM and SIGKILL when the server is stopped.
    :param lease_timeout: seconds the server may go without a lease renewal before its keeper (docker,
        kubernetes) or the reaper stops it; 0 for no lease.
    """

    #: The runtime's name, for messages.
    runtime: ClassVar[str] = "container"
    #: A repository path is a host folder mounted into the container (docker), not a path inside it.
    mounts_repository: ClassVar[bool] = False
    #: Where the container's lease keeper reads the last renewal (no keeper when ``None``).
    keeper_file: ClassVar[str | None] = None

    image: str = TRITON_IMAGE
    gpus: int | str | list[str] = 1
    model_repository: str | None = None
    s3_endpoint_url: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    log_verbose: int = 0
    stop_grace_period: float = 30
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT

    def __post_init__(self) -> None:
        self.environment = dict(self.environment or {})
        self.extra_args = list(self.extra_args or [])
        self.log_verbose = int(self.log_verbose)
        self.stop_grace_period = float(self.stop_grace_period)
        self.lease_timeout = float(self.lease_timeout or 0)

    def repository_for(self, model_repository: str) -> str:
        """The repository a server reads: ``model_repository`` of these options, else the DAG's."""
        return self.model_repository or str(model_repository)

    def describe(
        self,
        server_id: str,
        model_repository: str,
        models: list[str] | None,
        owner: ServerOwner | None = None,
    ) -> TritonContainer:
        """The container of the server ``server_id``.

        :param server_id: the new server's id.
        :param model_repository: the repository the DAG names (see :meth:`repository_for`).
        :param models: models to load (all in the repository when ``None``).
        :param owner: the task instance that starts it.
        :raises ValueError: for a relative path where the runtime needs one inside the container.
        """
        source, mount = self.repository_for(model_repository), None
        if source.startswith("s3://"):
            repository = triton_s3_path(source, self.s3_endpoint_url)
        elif self.mounts_repository and not is_remote_repository(source):
            repository, mount = CONTAINER_MODEL_REPOSITORY, source
        elif is_remote_repository(source) or source.startswith("/"):
            repository = source
        else:
            raise ValueError(
                f"Model repository {source!r}: the {self.runtime} runtime needs s3:// (gs://, as://) or an "
                "absolute path inside the container (on a volume of the server)."
            )
        command = tritonserver_command(
            repository, server_id, models, log_verbose=self.log_verbose, extra_args=self.extra_args
        )
        environment = dict(self.environment)
        if self.keeper_file and self.lease_timeout > 0:  # the server stops itself when its run stops renewing
            command = keeper_command(command)
            environment.update(keeper_environment(self.lease_timeout, self.keeper_file))
        return TritonContainer(
            server_id=server_id,
            command=command,
            environment=environment,
            owner=owner,
            lease_timeout=self.lease_timeout,
            repository=repository,
            mount=mount,
        )


@dataclass(frozen=True)
class TritonContainer:
    """One server's container, as every container runtime has it; each translates it into its platform's
    objects (a docker container, a Pod, an ECS task's overrides).

    :param server_id: the server's id: ``--id``, a label, the name of its container or Pod.
    :param command: its first process: tritonserver's command line, under the lease keeper where there is one.
    :param environment: its environment variables.
    :param owner: the task instance that starts it.
    :param lease_timeout: seconds without a lease renewal before it is stopped (0: no lease).
    :param repository: where tritonserver reads its models, as the container sees them.
    :param mount: a host folder to mount read-only at ``repository`` (``None``: nothing to mount).
    """

    server_id: str
    command: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    owner: ServerOwner | None = None
    lease_timeout: float = 0
    repository: str = CONTAINER_MODEL_REPOSITORY
    mount: str | None = None

    @property
    def labels(self) -> dict[str, str]:
        """Its labels with exact values (docker labels, ECS tags): managed-by, server id, owner, lease."""
        return server_labels(self.server_id, self.owner, self.lease_timeout)

    def lease_labels(self) -> dict[str, str]:
        """Its lease's timeout and first renewal, now (ECS tags, Pod annotations); ``{}`` without a lease."""
        if not self.lease_timeout or self.lease_timeout <= 0:
            return {}
        return {LEASE_TIMEOUT_KEY: f"{float(self.lease_timeout):g}", LEASE_RENEWED_KEY: f"{time.time():.0f}"}


#: Where a container finds the S3 credentials file that the runtime copies in (never its environment).
CREDENTIALS_PATH = "/run/airflow-batch-infer/aws-credentials"


@dataclass(frozen=True)
class S3Access:
    """How a containerised tritonserver reads ``s3://`` with an Airflow ``aws`` connection.

    :param environment: variables without secrets: the region and, with keys, ``AWS_SHARED_CREDENTIALS_FILE``.
    :param endpoint_url: the S3-compatible store's endpoint (``None`` for AWS S3).
    :param credentials: the text of an AWS shared-credentials file with the connection's keys (``None`` when
        it has none: the host's instance role, IRSA or the task role then serve).
    """

    environment: dict[str, str]
    endpoint_url: str | None
    credentials: str | None


def s3_access(aws_conn_id: str, region_name: str | None = None) -> S3Access:
    """What a container needs to read S3 with an Airflow ``aws`` connection, keys kept out of its environment.

    A container's environment is shown by ``docker inspect`` and kept in exited containers, so the keys go
    into a credentials file that the runtime copies into the container before it starts (removed with it).

    :param aws_conn_id: the connection (its extra's ``endpoint_url`` names an S3-compatible store).
    :param region_name: the region; the connection's when ``None``.
    """
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    hook = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="s3", region_name=region_name)
    credentials = hook.get_credentials()
    env = {"AWS_DEFAULT_REGION": hook.conn_region_name or "us-east-1"}
    text = None
    if credentials.access_key:
        lines = [
            "[default]",
            f"aws_access_key_id = {credentials.access_key}",
            f"aws_secret_access_key = {credentials.secret_key}",
        ]
        if credentials.token:
            lines.append(f"aws_session_token = {credentials.token}")
        text = "\n".join(lines) + "\n"
        env["AWS_SHARED_CREDENTIALS_FILE"] = CREDENTIALS_PATH
    return S3Access(env, hook.conn_config.get_service_endpoint_url("s3"), text)


def credentials_archive(text: str) -> bytes:
    """A tar archive of :data:`CREDENTIALS_PATH` holding ``text``, for ``put_archive`` at ``/``.

    Readable by the container's own user whoever it is (mode 0444): only the server's processes see it.
    """
    from airflow_batch_infer.runtimes.container_keeper import file_archive

    return file_archive(CREDENTIALS_PATH, text.encode())


def require_provider(module: str, extra: str) -> None:
    """Fail early, naming the pip extra, when the Airflow provider a runtime calls is not installed.

    :param module: e.g. ``airflow.providers.docker``.
    :param extra: e.g. ``docker``.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a parent package is missing too (airflow.providers.cncf)
        spec = None
    if spec is None:
        raise ImportError(
            f"{module} is not installed: `pip install 'airflow-provider-batch-infer[{extra}]'` "
            "to use this runtime."
        )
