"""The kubernetes runtime's options (:class:`PodOptions`) and objects, as pure functions: the server's Pod,
its Service, its NetworkPolicy.

:func:`build_pod` and :func:`build_service` return the kubernetes client's models and
:func:`build_network_policy` the API's JSON: ``nvidia.com/gpu`` limits, node selector and tolerations for
GPU nodes, a readiness probe on ``/v2/health/ready``, a memory-backed ``/dev/shm``, the model repository
from S3 or a volume, labels (selectable) plus annotations (exact) naming the DAG run, the lease
annotations, ``activeDeadlineSeconds``, no service-account token. The Service and the NetworkPolicy are
owned by the Pod (removed with it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from airflow_batch_infer.runtimes.container_keeper import POD_ANNOTATIONS_FILE
from airflow_batch_infer.runtimes.containers import (
    CREDENTIALS_PATH,
    PORTS,
    ContainerOptions,
    TritonContainer,
)
from airflow_batch_infer.runtimes.labels import (
    DAG_ID_KEY,
    RUN_ID_KEY,
    SERVER_ID_KEY,
    TASK_ID_KEY,
    ServerOwner,
    k8s_labels,
)

if TYPE_CHECKING:
    from kubernetes.client import V1Pod, V1Service

log = logging.getLogger(__name__)

CONTAINER_NAME = "tritonserver"
#: The usual taint of GPU node pools (GKE, EKS and AKS GPU nodes, the NVIDIA GPU Operator's guides).
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
#: Labels of the Pods a server admits by default: Airflow's Helm chart labels its Pods ``tier: airflow``.
AIRFLOW_PODS = {"tier": "airflow"}
#: Container states after which the server will never start (no need to wait for the deadline).
FATAL_WAITING_REASONS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
)


class _Json:
    """A response-like object, so that ``ApiClient.deserialize`` turns API-shaped dicts into models."""

    def __init__(self, data: Any) -> None:
        self.data = json.dumps(data)


def to_model(data: Any, kind: str) -> Any:
    """A dict in the Kubernetes API's shape (camelCase, as in a manifest) as the client's model ``kind``.

    :param data: e.g. ``{"name": "models", "persistentVolumeClaim": {"claimName": "triton-models"}}``.
    :param kind: e.g. ``"V1Volume"`` or ``"list[V1Toleration]"``.
    """
    from kubernetes.client import ApiClient

    if data is None or not isinstance(data, (dict, list)):
        return data
    return ApiClient().deserialize(_Json(data), kind)


@dataclass(kw_only=True)
class PodOptions(ContainerOptions):
    """A server's Pod: :class:`~.containers.ContainerOptions` and these.

    A repository path is inside the container: on ``model_repository_pvc`` or one of ``volumes``. With a
    ``lease_timeout``, the Pod's keeper stops its server when the renewal annotation, which it reads from a
    downward-API file, is older than that; the reaper deletes the Pod by the same annotation.

    :param gpus: GPUs in the container's limits (0: none, and no GPU toleration by default).
    :param gpu_resource: the GPUs' extended resource name.
    :param cpu: CPU request and limit, e.g. ``"8"``.
    :param memory: memory request and limit, e.g. ``"32Gi"``.
    :param shm_size: size of the memory-backed ``/dev/shm``.
    :param node_selector: node labels the Pod needs, e.g. ``{"nvidia.com/gpu.present": "true"}``.
    :param tolerations: tolerations (API shape); the ``nvidia.com/gpu`` taint's when ``None`` and gpus > 0.
    :param model_repository_pvc: a PersistentVolumeClaim holding the repository, mounted read-only at the
        repository path.
    :param aws_secret_name: a Secret with ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
        ``AWS_DEFAULT_REGION`` for S3, set as environment variables (a model's code can read them): prefer
        ``service_account_name`` with IAM roles for service accounts, or ``aws_credentials_secret``.
    :param aws_credentials_secret: a Secret whose key ``credentials`` is an AWS shared-credentials file,
        mounted read-only at ``/run/airflow-batch-infer/aws-credentials`` (``AWS_SHARED_CREDENTIALS_FILE``):
        keys for S3 without putting them in the environment.
    :param service_account_name: the Pod's service account.
    :param volumes: more volumes (API shape).
    :param volume_mounts: more mounts of the container (API shape).
    :param image_pull_secrets: Secrets to pull the image with.
    :param annotations: more Pod annotations.
    :param priority_class_name: the Pod's priority class.
    :param active_deadline_seconds: the Pod's ``activeDeadlineSeconds``, a hard bound that Kubernetes
        enforces whatever happens to Airflow and the reaper; ``None`` for none. Raise it for longer jobs.
    """

    runtime: ClassVar[str] = "kubernetes"
    keeper_file: ClassVar[str | None] = POD_ANNOTATIONS_FILE

    gpus: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str | None = None
    memory: str | None = None
    shm_size: str = "1Gi"
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    model_repository_pvc: str | None = None
    aws_secret_name: str | None = None
    aws_credentials_secret: str | None = None
    service_account_name: str | None = None
    volumes: list[dict[str, Any]] | None = None
    volume_mounts: list[dict[str, Any]] | None = None
    image_pull_secrets: list[str] | None = None
    annotations: dict[str, str] | None = None
    priority_class_name: str | None = None
    active_deadline_seconds: int | None = 86400

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gpus = int(self.gpus)  # type: ignore[arg-type]


def build_pod(options: PodOptions, container: TritonContainer, namespace: str) -> V1Pod:
    """The Pod of ``container``: a pure function.

    :param options: the runtime's options.
    :param container: the server's container (:meth:`~.containers.ContainerOptions.describe`).
    :param namespace: the namespace.
    """
    from kubernetes import client as k8s

    environment = dict(container.environment)
    shm = k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=options.shm_size)
    volumes = [_volume("dshm", "/dev/shm", None, empty_dir=shm)]  # noqa: S108 (the container's)
    if options.aws_credentials_secret:
        folder, filename = CREDENTIALS_PATH.rsplit("/", 1)
        items = [k8s.V1KeyToPath(key="credentials", path=filename)]
        secret = k8s.V1SecretVolumeSource(
            secret_name=options.aws_credentials_secret, items=items, default_mode=0o440
        )
        volumes.append(_volume("aws-credentials", folder, secret=secret))
        environment["AWS_SHARED_CREDENTIALS_FILE"] = CREDENTIALS_PATH
    if options.model_repository_pvc:
        claim = k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=options.model_repository_pvc, read_only=True
        )
        volumes.append(_volume("model-repository", container.repository, persistent_volume_claim=claim))
    if container.lease_timeout > 0:  # the keeper reads the renewal annotation from a downward-API file
        folder, filename = POD_ANNOTATIONS_FILE.rsplit("/", 1)
        field_ref = k8s.V1ObjectFieldSelector(field_path="metadata.annotations")
        items = [k8s.V1DownwardAPIVolumeFile(path=filename, field_ref=field_ref)]
        volumes.append(
            _volume("pod-annotations", folder, downward_api=k8s.V1DownwardAPIVolumeSource(items=items))
        )
    mounts = [mount for mount, _ in volumes] + to_model(options.volume_mounts or [], "list[V1VolumeMount]")
    pod_volumes = [volume for _, volume in volumes] + to_model(options.volumes or [], "list[V1Volume]")

    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if options.gpus:
        limits[options.gpu_resource] = str(int(options.gpus))
    for key, value in (("cpu", options.cpu), ("memory", options.memory)):
        if value:
            limits[key] = requests[key] = str(value)
    tolerations = options.tolerations
    if tolerations is None:
        tolerations = [GPU_TOLERATION] if options.gpus else []

    server = k8s.V1Container(
        name=CONTAINER_NAME,
        image=options.image,
        command=container.command,
        ports=[
            k8s.V1ContainerPort(name=key, container_port=port, protocol="TCP") for key, port in PORTS.items()
        ],
        resources=k8s.V1ResourceRequirements(limits=limits or None, requests=requests or None),
        readiness_probe=k8s.V1Probe(
            http_get=k8s.V1HTTPGetAction(path="/v2/health/ready", port="http"),
            period_seconds=5,
            timeout_seconds=3,
            failure_threshold=3,
        ),
        env=[k8s.V1EnvVar(name=k, value=str(v)) for k, v in environment.items()] or None,
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=options.aws_secret_name))]
        if options.aws_secret_name
        else None,
        volume_mounts=mounts,
    )
    owner = container.owner
    annotations = {
        **(owner.labels() if owner else {}),
        **container.lease_labels(),
        **(options.annotations or {}),
    }
    deadline = options.active_deadline_seconds
    return k8s.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=_metadata(container.server_id, namespace, owner, annotations=annotations or None),
        spec=k8s.V1PodSpec(
            restart_policy="Never",  # a server that dies is reported, not restarted mid-job
            containers=[server],
            volumes=pod_volumes,
            node_selector=options.node_selector or None,
            tolerations=to_model(tolerations, "list[V1Toleration]") or None,
            service_account_name=options.service_account_name,
            # The server calls no Kubernetes API: no token for a model's code to read.
            automount_service_account_token=False,
            image_pull_secrets=[k8s.V1LocalObjectReference(name=s) for s in options.image_pull_secrets or []]
            or None,
            termination_grace_period_seconds=int(options.stop_grace_period),
            priority_class_name=options.priority_class_name,
            enable_service_links=False,
            active_deadline_seconds=int(deadline) if deadline else None,
            affinity=_spread(owner),
        ),
    )


def _volume(name: str, path: str, read_only: bool | None = True, **source: Any) -> tuple[Any, Any]:
    """A volume of the Pod and the container's mount of it at ``path``.

    :param source: the volume's source, as ``V1Volume`` takes it (``secret=...``, ``empty_dir=...``).
    """
    from kubernetes import client as k8s

    mount = k8s.V1VolumeMount(name=name, mount_path=path, read_only=read_only)
    return mount, k8s.V1Volume(name=name, **source)


def _metadata(server_id: str, namespace: str, owner: ServerOwner | None, **more: Any) -> Any:
    """The metadata of the server's Pod or Service: its name, namespace and selectable labels."""
    from kubernetes import client as k8s

    return k8s.V1ObjectMeta(name=server_id, namespace=namespace, labels=k8s_labels(server_id, owner), **more)


def _spread(owner: ServerOwner | None) -> Any:
    """Anti-affinity: the servers of one start task (``servers=N``) on different nodes where it can."""
    from kubernetes import client as k8s

    if owner is None:
        return None
    same_start = {
        key: value
        for key, value in k8s_labels("-", owner).items()
        if key in (DAG_ID_KEY, RUN_ID_KEY, TASK_ID_KEY)
    }
    term = k8s.V1PodAffinityTerm(
        label_selector=k8s.V1LabelSelector(match_labels=same_start), topology_key="kubernetes.io/hostname"
    )
    return k8s.V1Affinity(
        pod_anti_affinity=k8s.V1PodAntiAffinity(
            preferred_during_scheduling_ignored_during_execution=[
                k8s.V1WeightedPodAffinityTerm(weight=100, pod_affinity_term=term)
            ]
        )
    )


def build_network_policy(
    *,
    server_id: str,
    namespace: str,
    allowed_clients: dict[str, str],
    owner: ServerOwner | None = None,
    pod_uid: str | None = None,
) -> dict[str, Any]:
    """A NetworkPolicy that admits to the server's Pod only the Pods labelled ``allowed_clients`` (the
    Airflow workers), on the server's ports, and nothing else. Owned by the Pod (removed with it).

    :param server_id: the Pod's ``app.kubernetes.io/instance`` label, and the policy's name.
    :param namespace: the namespace (clients are admitted from it only).
    :param allowed_clients: labels of the client Pods, e.g. ``{"tier": "airflow"}`` (Airflow's Helm chart).
    :param owner: the task instance that starts the server (labels).
    :param pod_uid: the Pod's uid, for the owner reference (none when ``None``).
    """
    metadata: dict[str, Any] = {
        "name": server_id,
        "namespace": namespace,
        "labels": k8s_labels(server_id, owner),
    }
    if pod_uid:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": server_id, "uid": pod_uid}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": {SERVER_ID_KEY: server_id}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": dict(allowed_clients)}}],
                    "ports": [{"protocol": "TCP", "port": port} for port in PORTS.values()],
                }
            ],
        },
    }


def build_service(
    *, server_id: str, namespace: str, owner: ServerOwner | None = None, pod_uid: str | None = None
) -> V1Service:
    """The ClusterIP Service in front of the Pod, owned by it (removed with it).

    :param server_id: the Service's name and the Pod label it selects.
    :param namespace: the namespace.
    :param owner: the task instance that starts the server (labels).
    :param pod_uid: the Pod's uid, for the owner reference (none when ``None``).
    """
    from kubernetes import client as k8s

    references = None
    if pod_uid:
        references = [k8s.V1OwnerReference(api_version="v1", kind="Pod", name=server_id, uid=pod_uid)]
    return k8s.V1Service(
        api_version="v1",
        kind="Service",
        metadata=_metadata(server_id, namespace, owner, owner_references=references),
        spec=k8s.V1ServiceSpec(
            type="ClusterIP",
            selector={SERVER_ID_KEY: server_id},
            ports=[
                k8s.V1ServicePort(name=key, port=port, target_port=key, protocol="TCP")
                for key, port in PORTS.items()
            ],
        ),
    )


def container_summary(pod: Any) -> str:
    """One line on the Pod's container: not started, waiting (why), terminated (code), running, ready."""
    statuses = (pod.status.container_statuses or []) if pod.status else []
    if not statuses:
        return "container not started"
    state = statuses[0].state
    if state and state.terminated:
        t = state.terminated
        return f"container terminated: {t.reason} (exit code {t.exit_code}) {t.message or ''}".rstrip()
    if state and state.waiting:
        return f"container waiting: {state.waiting.reason} {state.waiting.message or ''}".rstrip()
    return "container running" + (", ready" if statuses[0].ready else ", not ready")
