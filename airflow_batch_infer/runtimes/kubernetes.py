"""The kubernetes runtime: a Pod running NVIDIA's ``tritonserver`` image on a GPU node, plus a Service.

Calls the Kubernetes API through the cncf.kubernetes provider's ``KubernetesHook``. The Pod, its Service and
its NetworkPolicy are built by :mod:`.kubernetes_specs` (re-exported here); the Service and the
NetworkPolicy are owned by the Pod. Needs the ``kubernetes`` extra.
"""

from __future__ import annotations

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
    require_provider,
)
from airflow_batch_infer.runtimes.kubernetes_specs import (
    AIRFLOW_PODS,
    CONTAINER_NAME,
    FATAL_WAITING_REASONS,
    build_network_policy,
    build_pod,
    build_service,
    container_summary,
)
from airflow_batch_infer.runtimes.labels import (
    LEASE_RENEWED_KEY,
    MANAGED_BY,
    MANAGED_BY_KEY,
    ServerOwner,
    lease_from_labels,
    new_server_id,
)

if TYPE_CHECKING:
    from kubernetes.client import CoreV1Api, V1Pod

log = logging.getLogger(__name__)


__all__ = ["KubernetesTritonRuntime", "build_network_policy", "build_pod", "build_service"]


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
    :param aws_secret_name: a Secret holding the S3 keys as environment variables (see :func:`build_pod`).
    :param aws_credentials_secret: a Secret with an AWS credentials file, mounted (see :func:`build_pod`).
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
    :param allowed_clients: labels of the Pods admitted to the server by its NetworkPolicy (the Airflow
        workers; default ``{"tier": "airflow"}``, as Airflow's Helm chart labels its Pods); ``{}`` for no
        NetworkPolicy. The cluster's network plugin must enforce NetworkPolicies.
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
        aws_credentials_secret: str | None = None,
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
        allowed_clients: dict[str, str] | None = None,
    ) -> None:
        require_provider("airflow.providers.cncf.kubernetes", "kubernetes")
        self.allowed_clients = dict(allowed_clients) if allowed_clients is not None else dict(AIRFLOW_PODS)
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
            "aws_credentials_secret": aws_credentials_secret,
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

    @property
    def networking_v1(self) -> Any:
        """The Kubernetes networking API client (NetworkPolicies), on the hook's API client."""
        from kubernetes.client import NetworkingV1Api

        return NetworkingV1Api(self.hook.api_client)

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
            if self.allowed_clients:
                policy = build_network_policy(
                    server_id=server_id,
                    namespace=self.namespace,
                    allowed_clients=self.allowed_clients,
                    owner=owner,
                    pod_uid=created.metadata.uid,
                )
                self.networking_v1.create_namespaced_network_policy(namespace=self.namespace, body=policy)
        except ApiException as exc:
            self._delete(server_id)
            raise ServerStartError(
                f"Kubernetes refused the Service or NetworkPolicy of Triton server {server_id}: {exc.status} "
                f"{exc.reason}: {exc.body}; its Pod was deleted."
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
            return f"its Pod ended ({status.phase}): {container_summary(pod)}"
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
                    f"Pod {name}: {pod.status.phase if pod.status else '?'}; {container_summary(pod)}"
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
        name, namespace = info.handle["pod_name"], info.handle["namespace"]
        try:
            self.core_v1.patch_namespaced_pod(name=name, namespace=namespace, body=body)
        except ApiException as exc:
            if exc.status == 404:
                log.warning("Triton Pod %s is gone: its lease cannot be renewed.", name)
                return False
            raise
        return True
