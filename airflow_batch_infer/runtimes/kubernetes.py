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

from airflow_batch_infer.runtimes.base import ServerInfo, ServerStartError, TritonRuntime
from airflow_batch_infer.runtimes.containers import PORTS, require_provider
from airflow_batch_infer.runtimes.kubernetes_specs import (
    AIRFLOW_PODS,
    CONTAINER_NAME,
    FATAL_WAITING_REASONS,
    PodOptions,
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


__all__ = [
    "KubernetesTritonRuntime",
    "PodOptions",
    "build_network_policy",
    "build_pod",
    "build_service",
]


class KubernetesTritonRuntime(TritonRuntime):
    """Runs NVIDIA's ``tritonserver`` image as a Pod on a GPU node, reached through a ClusterIP Service.

    The workers reach it at ``<server id>.<namespace>.svc.<cluster_domain>``, so they must run in the
    cluster (KubernetesExecutor, or Celery workers in the cluster).

    :param namespace: the namespace; the connection's, else ``default``.
    :param kubernetes_conn_id: the ``kubernetes`` connection (in-cluster config when it has none).
    :param cluster_domain: the cluster's DNS domain.
    :param allowed_clients: labels of the Pods admitted to the server by its NetworkPolicy (the Airflow
        workers; default ``{"tier": "airflow"}``, as Airflow's Helm chart labels its Pods); ``{}`` for no
        NetworkPolicy. The cluster's network plugin must enforce NetworkPolicies.
    :param startup_timeout: seconds from launch until the models must be ready (scheduling, image pull and
        model load included).
    :param options: the Pod's options, :class:`~airflow_batch_infer.runtimes.kubernetes_specs.PodOptions`
        (``image``, ``gpus``, ``cpu``, ``memory``, ``node_selector``, ``model_repository``,
        ``model_repository_pvc``, ``service_account_name``, ``environment``, ``volumes``, ``lease_timeout``,
        ``active_deadline_seconds``, ...).
    """

    name = "kubernetes"

    def __init__(
        self,
        namespace: str | None = None,
        kubernetes_conn_id: str = "kubernetes_default",
        cluster_domain: str = "cluster.local",
        allowed_clients: dict[str, str] | None = None,
        startup_timeout: float = 1200,
        **options: Any,
    ) -> None:
        require_provider("airflow.providers.cncf.kubernetes", "kubernetes")
        self.options = PodOptions(**options)
        self.lease_timeout = self.options.lease_timeout
        self.allowed_clients = dict(allowed_clients) if allowed_clients is not None else dict(AIRFLOW_PODS)
        self._namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.cluster_domain = cluster_domain
        self.startup_timeout = float(startup_timeout)

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
        container = self.options.describe(server_id, model_repository, models, owner)
        return build_pod(self.options, container, self.namespace)

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
        handle = {
            "server_id": server_id,
            "pod_name": server_id,
            "service_name": server_id,
            "namespace": self.namespace,
            "owner": owner.to_dict() if owner else None,
            "started_at": started_at,
        }
        return ServerInfo.at(
            self.name, f"{server_id}.{self.namespace}.svc.{self.cluster_domain}", PORTS, handle
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
                    body=k8s.V1DeleteOptions(grace_period_seconds=int(self.options.stop_grace_period)),
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
