"""The kubernetes runtime: a Pod running NVIDIA's ``tritonserver`` image on a GPU node, plus a Service.

Calls the Kubernetes API through the cncf.kubernetes provider's
:class:`~airflow.providers.cncf.kubernetes.hooks.kubernetes.KubernetesHook`. :func:`build_pod` and
:func:`build_service` are pure functions that return the kubernetes client's models: ``nvidia.com/gpu``
limits, node selector and tolerations for GPU nodes, a readiness probe on ``/v2/health/ready``, a
memory-backed ``/dev/shm``, the model repository from S3 or a volume, and labels (selectable) plus
annotations (exact) naming the DAG run. The Service is owned by the Pod, so deleting the Pod also removes
it. Needs the ``kubernetes`` extra (``apache-airflow-providers-cncf-kubernetes``).
"""

from __future__ import annotations

import json
import logging
import time
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow_batch_infer.runtimes.base import (
    DEFAULT_LEASE_TIMEOUT,
    ServerInfo,
    ServerStartError,
    TritonRuntime,
)
from airflow_batch_infer.runtimes.containers import (
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    TRITON_IMAGE,
    is_remote_repository,
    require_provider,
    triton_s3_path,
    tritonserver_command,
)
from airflow_batch_infer.runtimes.labels import (
    LEASE_RENEWED_KEY,
    LEASE_TIMEOUT_KEY,
    MANAGED_BY,
    MANAGED_BY_KEY,
    SERVER_ID_KEY,
    ServerOwner,
    k8s_labels,
    lease_from_labels,
    new_server_id,
)

if TYPE_CHECKING:
    from kubernetes.client import CoreV1Api, V1Pod, V1Service

log = logging.getLogger(__name__)

CONTAINER_NAME = "tritonserver"
#: The usual taint of GPU node pools (GKE, EKS and AKS GPU nodes, the NVIDIA GPU Operator's guides).
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
#: Container states after which the server will never start (no need to wait for the deadline).
FATAL_WAITING_REASONS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
)
_PORTS = {"http": HTTP_PORT, "grpc": GRPC_PORT, "metrics": METRICS_PORT}


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


def build_pod(
    *,
    server_id: str,
    namespace: str,
    image: str,
    model_repository: str,
    models: list[str] | None,
    owner: ServerOwner | None = None,
    gpus: int = 1,
    gpu_resource: str = "nvidia.com/gpu",
    cpu: str | None = None,
    memory: str | None = None,
    shm_size: str = "1Gi",
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
    model_repository_pvc: str | None = None,
    s3_endpoint_url: str | None = None,
    aws_secret_name: str | None = None,
    service_account_name: str | None = None,
    environment: dict[str, str] | None = None,
    volumes: list[dict[str, Any]] | None = None,
    volume_mounts: list[dict[str, Any]] | None = None,
    image_pull_secrets: list[str] | None = None,
    annotations: dict[str, str] | None = None,
    priority_class_name: str | None = None,
    extra_args: list[str] | None = None,
    log_verbose: int = 0,
    stop_grace_period: int = 30,
    lease_timeout: float = 0,
    active_deadline_seconds: int | None = None,
) -> V1Pod:
    """The server's Pod: a pure function of the runtime's options.

    :param server_id: the Pod's name, ``--id`` and the label the Service selects.
    :param namespace: the namespace.
    :param image: the tritonserver image.
    :param model_repository: ``s3://...`` (or ``gs://``, ``as://``), or a path inside the container (on
        ``model_repository_pvc`` or one of ``volumes``).
    :param models: models to load (all in the repository when ``None``).
    :param owner: the task instance that starts it (labels and annotations).
    :param gpus: GPUs in the container's limits (0: none, and no GPU toleration by default).
    :param gpu_resource: the extended resource name of the GPUs.
    :param cpu: CPU request and limit, e.g. ``"8"``.
    :param memory: memory request and limit, e.g. ``"32Gi"``.
    :param shm_size: size of the memory-backed ``/dev/shm``.
    :param node_selector: node labels the Pod needs, e.g. ``{"nvidia.com/gpu.present": "true"}``.
    :param tolerations: tolerations (API shape); the ``nvidia.com/gpu`` taint's when ``None`` and gpus > 0.
    :param model_repository_pvc: a PersistentVolumeClaim mounted read-only at ``model_repository``.
    :param s3_endpoint_url: endpoint of an S3-compatible store holding the repository.
    :param aws_secret_name: a Secret with ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
        ``AWS_DEFAULT_REGION`` for S3 (or use ``service_account_name`` with IAM roles for service accounts).
    :param service_account_name: the Pod's service account.
    :param environment: environment variables.
    :param volumes: more volumes (API shape).
    :param volume_mounts: more mounts of the container (API shape).
    :param image_pull_secrets: Secrets to pull the image with.
    :param annotations: more Pod annotations.
    :param priority_class_name: the Pod's priority class.
    :param extra_args: more tritonserver flags.
    :param log_verbose: Triton's ``--log-verbose`` level.
    :param stop_grace_period: seconds between SIGTERM and SIGKILL when deleted.
    :param lease_timeout: seconds without a lease renewal before the reaper deletes the Pod (annotations
        ``airflow-batch-infer/lease-timeout`` and ``lease-renewed-at``, the latter patched by each renewal).
    :param active_deadline_seconds: the Pod's hard bound: Kubernetes kills it this long after it started,
        whatever happens to Airflow (``None``: no bound).
    """
    from kubernetes import client as k8s

    if model_repository.startswith("s3://"):
        repository = triton_s3_path(model_repository, s3_endpoint_url)
    elif is_remote_repository(model_repository) or model_repository.startswith("/"):
        repository = model_repository
    else:
        raise ValueError(
            f"Model repository {model_repository!r}: the kubernetes runtime needs s3:// (gs://, as://) or an "
            "absolute path inside the container (with model_repository_pvc or volumes)."
        )
    mounts = [k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")]  # noqa: S108 (the container's)
    pod_volumes = [
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=shm_size))
    ]
    if model_repository_pvc:
        mounts.append(k8s.V1VolumeMount(name="model-repository", mount_path=repository, read_only=True))
        pod_volumes.append(
            k8s.V1Volume(
                name="model-repository",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name=model_repository_pvc, read_only=True
                ),
            )
        )
    mounts.extend(to_model(volume_mounts or [], "list[V1VolumeMount]"))
    pod_volumes.extend(to_model(volumes or [], "list[V1Volume]"))

    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if gpus:
        limits[gpu_resource] = str(int(gpus))
    for key, value in (("cpu", cpu), ("memory", memory)):
        if value:
            limits[key] = requests[key] = str(value)
    if tolerations is None:
        tolerations = [GPU_TOLERATION] if gpus else []

    container = k8s.V1Container(
        name=CONTAINER_NAME,
        image=image,
        command=tritonserver_command(
            repository, server_id, models, log_verbose=log_verbose, extra_args=extra_args
        ),
        ports=[
            k8s.V1ContainerPort(name=key, container_port=port, protocol="TCP") for key, port in _PORTS.items()
        ],
        resources=k8s.V1ResourceRequirements(limits=limits or None, requests=requests or None),
        readiness_probe=k8s.V1Probe(
            http_get=k8s.V1HTTPGetAction(path="/v2/health/ready", port="http"),
            period_seconds=5,
            timeout_seconds=3,
            failure_threshold=3,
        ),
        env=[k8s.V1EnvVar(name=k, value=str(v)) for k, v in (environment or {}).items()] or None,
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=aws_secret_name))]
        if aws_secret_name
        else None,
        volume_mounts=mounts,
    )
    return k8s.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=k8s.V1ObjectMeta(
            name=server_id,
            namespace=namespace,
            labels=k8s_labels(server_id, owner),
            annotations={
                **(owner.labels() if owner else {}),
                **_lease_annotations(lease_timeout),
                **(annotations or {}),
            }
            or None,
        ),
        spec=k8s.V1PodSpec(
            restart_policy="Never",  # a server that dies is reported, not restarted mid-job
            containers=[container],
            volumes=pod_volumes,
            node_selector=node_selector or None,
            tolerations=to_model(tolerations, "list[V1Toleration]") or None,
            service_account_name=service_account_name,
            # The server calls no Kubernetes API: no token for a model's code to read.
            automount_service_account_token=False,
            image_pull_secrets=[k8s.V1LocalObjectReference(name=s) for s in image_pull_secrets or []] or None,
            termination_grace_period_seconds=int(stop_grace_period),
            priority_class_name=priority_class_name,
            enable_service_links=False,
            active_deadline_seconds=int(active_deadline_seconds) if active_deadline_seconds else None,
        ),
    )


def _lease_annotations(lease_timeout: float) -> dict[str, str]:
    if not lease_timeout or lease_timeout <= 0:
        return {}
    return {LEASE_TIMEOUT_KEY: f"{float(lease_timeout):g}", LEASE_RENEWED_KEY: f"{time.time():.0f}"}


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
        metadata=k8s.V1ObjectMeta(
            name=server_id,
            namespace=namespace,
            labels=k8s_labels(server_id, owner),
            owner_references=references,
        ),
        spec=k8s.V1ServiceSpec(
            type="ClusterIP",
            selector={SERVER_ID_KEY: server_id},
            ports=[
                k8s.V1ServicePort(name=key, port=port, target_port=key, protocol="TCP")
                for key, port in _PORTS.items()
            ],
        ),
    )


class KubernetesTritonRuntime(TritonRuntime):
    """Runs NVIDIA's ``tritonserver`` image as a Pod on a GPU node, reached through a ClusterIP Service.

    The workers reach it at ``<server id>.<namespace>.svc.<cluster_domain>``, so they must run in the
    cluster (KubernetesExecutor, or Celery workers in the cluster).

    :param namespace: the namespace; the connection's, else ``default``.
    :param kubernetes_conn_id: the ``kubernetes`` connection (in-cluster config when it has none).
    :param image: the image (``TRITON_TRTLLM_IMAGE`` for TensorRT-LLM models).
    :param gpus: GPUs in the container's limits (0 for a CPU-only server).
    :param gpu_resource: the GPUs' extended resource name.
    :param cpu: CPU request and limit.
    :param memory: memory request and limit.
    :param shm_size: size of the memory-backed ``/dev/shm``.
    :param node_selector: node labels the Pod needs (e.g. ``{"nvidia.com/gpu.present": "true"}``).
    :param tolerations: tolerations in the API's shape; the ``nvidia.com/gpu`` taint's by default.
    :param model_repository: where the server reads its models when not the path the DAG names:
        ``s3://bucket/prefix`` or a path inside the container.
    :param model_repository_pvc: a PersistentVolumeClaim holding the repository, mounted read-only at
        the repository path.
    :param s3_endpoint_url: endpoint of an S3-compatible store (AWS S3 when ``None``).
    :param aws_secret_name: a Secret holding the S3 keys as environment variables.
    :param service_account_name: the Pod's service account (IAM roles for service accounts).
    :param environment: more environment variables.
    :param volumes: more volumes, API shape.
    :param volume_mounts: more volume mounts, API shape.
    :param image_pull_secrets: Secrets for a private registry.
    :param annotations: more Pod annotations.
    :param priority_class_name: the Pod's priority class.
    :param cluster_domain: the cluster's DNS domain.
    :param extra_args: more tritonserver flags.
    :param log_verbose: Triton's ``--log-verbose`` level.
    :param startup_timeout: seconds from launch until the models must be ready (scheduling, image pull and
        model load included).
    :param stop_grace_period: seconds between SIGTERM and SIGKILL when stopping.
    :param lease_timeout: seconds the Pod may go without a lease renewal before the reaper deletes it
        (annotations; each renewal patches ``airflow-batch-infer/lease-renewed-at``); 0 for no lease.
    :param active_deadline_seconds: the Pod's ``activeDeadlineSeconds``, a hard bound that Kubernetes
        enforces whatever happens to Airflow and the reaper; ``None`` for none. Raise it for longer jobs.
    """

    name = "kubernetes"

    def __init__(
        self,
        namespace: str | None = None,
        kubernetes_conn_id: str = "kubernetes_default",
        image: str = TRITON_IMAGE,
        gpus: int = 1,
        gpu_resource: str = "nvidia.com/gpu",
        cpu: str | None = None,
        memory: str | None = None,
        shm_size: str = "1Gi",
        node_selector: dict[str, str] | None = None,
        tolerations: list[dict[str, Any]] | None = None,
        model_repository: str | None = None,
        model_repository_pvc: str | None = None,
        s3_endpoint_url: str | None = None,
        aws_secret_name: str | None = None,
        service_account_name: str | None = None,
        environment: dict[str, str] | None = None,
        volumes: list[dict[str, Any]] | None = None,
        volume_mounts: list[dict[str, Any]] | None = None,
        image_pull_secrets: list[str] | None = None,
        annotations: dict[str, str] | None = None,
        priority_class_name: str | None = None,
        cluster_domain: str = "cluster.local",
        extra_args: list[str] | None = None,
        log_verbose: int = 0,
        startup_timeout: float = 1200,
        stop_grace_period: float = 30,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        active_deadline_seconds: int | None = 86400,
    ) -> None:
        require_provider("airflow.providers.cncf.kubernetes", "kubernetes")
        self._namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.pod_options: dict[str, Any] = {
            "image": image,
            "gpus": int(gpus),
            "gpu_resource": gpu_resource,
            "cpu": cpu,
            "memory": memory,
            "shm_size": shm_size,
            "node_selector": node_selector,
            "tolerations": tolerations,
            "model_repository_pvc": model_repository_pvc,
            "s3_endpoint_url": s3_endpoint_url,
            "aws_secret_name": aws_secret_name,
            "service_account_name": service_account_name,
            "environment": environment,
            "volumes": volumes,
            "volume_mounts": volume_mounts,
            "image_pull_secrets": image_pull_secrets,
            "annotations": annotations,
            "priority_class_name": priority_class_name,
            "extra_args": extra_args,
            "log_verbose": int(log_verbose),
            "stop_grace_period": int(stop_grace_period),
            "lease_timeout": float(lease_timeout or 0),
            "active_deadline_seconds": active_deadline_seconds,
        }
        self.lease_timeout = float(lease_timeout or 0)
        self.model_repository = model_repository
        self.cluster_domain = cluster_domain
        self.startup_timeout = float(startup_timeout)
        self.stop_grace_period = float(stop_grace_period)

    @cached_property
    def hook(self) -> Any:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(conn_id=self.kubernetes_conn_id)

    @property
    def core_v1(self) -> CoreV1Api:
        """The Kubernetes core API client, from the cncf.kubernetes provider's hook."""
        return self.hook.core_v1_client

    @cached_property
    def namespace(self) -> str:
        return self._namespace or self.hook.get_namespace() or "default"

    # ------------------------------------------------------------------ launch

    def pod_spec(
        self, server_id: str, model_repository: str, models: list[str] | None, owner: ServerOwner | None
    ) -> V1Pod:
        """:func:`build_pod` with this runtime's options."""
        return build_pod(
            server_id=server_id,
            namespace=self.namespace,
            model_repository=self.model_repository or model_repository,
            models=models,
            owner=owner,
            **self.pod_options,
        )

    def launch(
        self, model_repository: str, models: list[str] | None = None, owner: ServerOwner | None = None
    ) -> ServerInfo:
        """Create the Pod and its Service; return the Service's address without waiting for readiness."""
        from kubernetes.client.exceptions import ApiException

        server_id = new_server_id()
        pod = self.pod_spec(server_id, str(model_repository), models, owner)
        api = self.core_v1
        try:
            created = api.create_namespaced_pod(namespace=self.namespace, body=pod)
        except ApiException as exc:
            raise ServerStartError(
                f"Kubernetes refused the Pod of Triton server {server_id}: "
                f"{exc.status} {exc.reason}: {exc.body}"
            ) from exc
        try:
            service = build_service(
                server_id=server_id, namespace=self.namespace, owner=owner, pod_uid=created.metadata.uid
            )
            api.create_namespaced_service(namespace=self.namespace, body=service)
        except ApiException as exc:
            self._delete(server_id)
            raise ServerStartError(
                f"Kubernetes refused the Service of Triton server {server_id}: {exc.status} {exc.reason}: "
                f"{exc.body}; its Pod was deleted."
            ) from exc
        info = self._server_info(server_id, owner, time.time())
        log.info("Triton Pod %s created in namespace %s; gRPC %s", server_id, self.namespace, info.grpc_url)
        return info

    def _server_info(self, server_id: str, owner: ServerOwner | None, started_at: float) -> ServerInfo:
        host = f"{server_id}.{self.namespace}.svc.{self.cluster_domain}"
        return ServerInfo(
            runtime=self.name,
            grpc_url=f"{host}:{GRPC_PORT}",
            http_url=f"http://{host}:{HTTP_PORT}",
            metrics_url=f"http://{host}:{METRICS_PORT}/metrics",
            handle={
                "server_id": server_id,
                "pod_name": server_id,
                "service_name": server_id,
                "namespace": self.namespace,
                "owner": owner.to_dict() if owner else None,
                "started_at": started_at,
            },
        )

    # ------------------------------------------------------------------ stop and inspect

    def _read_pod(self, info: ServerInfo) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.core_v1.read_namespaced_pod(
                name=info.handle["pod_name"], namespace=info.handle["namespace"]
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _delete(self, name: str, namespace: str | None = None) -> tuple[bool, bool]:
        """Delete the Pod and the Service called ``name``; say which of them existed."""
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException

        namespace = namespace or self.namespace
        existed = []
        for delete in (self.core_v1.delete_namespaced_pod, self.core_v1.delete_namespaced_service):
            try:
                delete(
                    name=name,
                    namespace=namespace,
                    body=k8s.V1DeleteOptions(grace_period_seconds=int(self.stop_grace_period)),
                )
                existed.append(True)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                existed.append(False)
        return existed[0], existed[1]

    def stop(self, info: ServerInfo) -> bool:
        """Delete the Pod (SIGTERM, SIGKILL after ``stop_grace_period``) and its Service.

        :returns: ``False`` when the Pod was already gone or had ended (what is left is deleted all the same).
        """
        pod = self._read_pod(info)
        running = pod is not None and pod.status is not None and pod.status.phase in ("Pending", "Running")
        pod_existed, _ = self._delete(info.handle["pod_name"], info.handle["namespace"])
        if running:
            log.info("Deleted Triton Pod %s and its Service.", info.handle["pod_name"])
        elif pod_existed:
            log.info("Triton Pod %s had already ended; deleted it.", info.handle["pod_name"])
        else:
            log.info("Triton Pod %s was already gone.", info.handle["pod_name"])
        return running

    def is_running(self, info: ServerInfo) -> bool:
        """Whether the Pod exists and is pending or running."""
        pod = self._read_pod(info)
        return bool(pod and pod.status and pod.status.phase in ("Pending", "Running"))

    def failure_reason(self, info: ServerInfo) -> str | None:
        """Why the Pod will never serve: gone, ended, or its container cannot start (image pull, config)."""
        pod = self._read_pod(info)
        if pod is None:
            return "its Pod is gone"
        status = pod.status
        if status is None:
            return None
        if status.phase in ("Failed", "Succeeded"):
            return f"its Pod ended ({status.phase}): {_container_summary(pod)}"
        for container in status.container_statuses or []:
            waiting = container.state.waiting if container.state else None
            if waiting and waiting.reason in FATAL_WAITING_REASONS:
                return f"its container cannot start: {waiting.reason}: {waiting.message or ''}".rstrip(": ")
        return None

    def log_tail(self, info: ServerInfo, lines: int = 40) -> str:
        """The container's last log lines, after the Pod's status and its recent events."""
        from kubernetes.client.exceptions import ApiException

        name, namespace = info.handle["pod_name"], info.handle["namespace"]
        parts = []
        try:
            pod = self._read_pod(info)
            if pod is not None:
                parts.append(
                    f"Pod {name}: {pod.status.phase if pod.status else '?'}; {_container_summary(pod)}"
                )
                for condition in (pod.status.conditions or []) if pod.status else []:
                    if condition.status != "True" and condition.message:
                        parts.append(f"  {condition.type}: {condition.reason}: {condition.message}")
            events = self.core_v1.list_namespaced_event(
                namespace=namespace, field_selector=f"involvedObject.name={name}"
            )
            for event in (events.items or [])[-10:]:
                parts.append(f"  event {event.type} {event.reason}: {event.message}")
        except ApiException as exc:
            parts.append(f"(Pod status unavailable: {exc.status} {exc.reason})")
        try:
            text = self.core_v1.read_namespaced_pod_log(
                name=name, namespace=namespace, container=CONTAINER_NAME, tail_lines=lines
            )
            parts.append("\n".join(str(text).splitlines()[-lines:]))
        except ApiException as exc:
            parts.append(f"(no container log yet: {exc.status} {exc.reason})")
        return "\n".join(parts)

    def list_servers(self) -> list[ServerInfo]:
        """Pods labelled as ours in the namespace, in any phase."""
        pods = self.core_v1.list_namespaced_pod(
            namespace=self.namespace, label_selector=f"{MANAGED_BY_KEY}={MANAGED_BY}"
        )
        servers = []
        for pod in pods.items or []:
            meta = pod.metadata
            owner = ServerOwner.from_labels(meta.annotations or {})
            created = meta.creation_timestamp.timestamp() if meta.creation_timestamp else 0.0
            info = self._server_info(meta.name, owner, created)
            info.handle["namespace"] = meta.namespace or self.namespace
            info.handle["state"] = pod.status.phase if pod.status else None
            info.handle.update(lease_from_labels(meta.annotations))
            servers.append(info)
        return servers

    def renew_lease(self, info: ServerInfo) -> bool:
        """Renew the Pod's lease: patch its ``airflow-batch-infer/lease-renewed-at`` annotation to now."""
        from kubernetes.client.exceptions import ApiException

        if not self.lease_timeout:
            return False
        body = {"metadata": {"annotations": {LEASE_RENEWED_KEY: f"{time.time():.0f}"}}}
        try:
            self.core_v1.patch_namespaced_pod(
                name=info.handle["pod_name"], namespace=info.handle["namespace"], body=body
            )
        except ApiException as exc:
            if exc.status == 404:
                log.warning("Triton Pod %s is gone: its lease cannot be renewed.", info.handle["pod_name"])
                return False
            raise
        return True


def _container_summary(pod: Any) -> str:
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
