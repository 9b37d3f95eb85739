"""What the container runtimes (docker, kubernetes, ecs) share: NVIDIA's image, the command line, S3 paths."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from airflow_batch_infer.runtimes.access import restricted_flags

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
