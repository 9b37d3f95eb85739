"""The ecs runtime: an ECS task on GPU capacity (EC2 container instances) running NVIDIA's ``tritonserver``.

Calls ECS through the amazon provider's :class:`~airflow.providers.amazon.aws.hooks.ecs.EcsHook` (CloudWatch
Logs through ``AwsLogsHook`` for the server's log). :func:`build_task_definition` and :func:`build_run_task`
(:mod:`.ecs_specs`, re-exported here) are pure functions returning the keyword arguments of
``register_task_definition`` and ``run_task``. Without a ``task_definition`` of your own, the runtime
registers one (a new revision only when the options change). GPUs on ECS need EC2 capacity: a GPU
capacity provider or ``launch_type="EC2"`` with GPU container instances (ECS GPU-optimised AMI).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import cached_property
from typing import Any

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
    triton_s3_path,
    tritonserver_command,
)
from airflow_batch_infer.runtimes.ecs_specs import (
    DEFAULT_FAMILY,
    OWNER_ENV,
    SPEC_HASH_TAG,
    STARTED_BY,
    build_run_task,
    build_task_definition,
    owner_from_overrides,
    task_summary,
)
from airflow_batch_infer.runtimes.labels import (
    LEASE_RENEWED_KEY,
    SERVER_ID_KEY,
    ServerOwner,
    lease_from_labels,
    new_server_id,
)

__all__ = ["OWNER_ENV", "STARTED_BY", "EcsTritonRuntime", "build_run_task", "build_task_definition"]

log = logging.getLogger(__name__)


class EcsTritonRuntime(TritonRuntime):
    """Runs NVIDIA's ``tritonserver`` image as an ECS task on GPU container instances.

    :param cluster: the ECS cluster (name or ARN).
    :param aws_conn_id: the ``aws`` connection.
    :param region_name: the region; the connection's when ``None``.
    :param task_definition: a task definition of your own (its ``container_name`` container runs
        tritonserver; the command is set at run time); registered from the options below when ``None``.
    :param container_name: the Triton container's name.
    :param family: family of the registered task definition.
    :param image: the image (``TRITON_TRTLLM_IMAGE`` for TensorRT-LLM models).
    :param gpus: GPUs reserved (0 for a CPU-only server).
    :param cpu: task CPU units, e.g. ``"8192"``.
    :param memory: task memory in MiB.
    :param shm_size_mib: ``/dev/shm`` size in MiB.
    :param network_mode: ``awsvpc``, ``host`` or ``bridge`` (ports 8000-8002 are static on the host).
    :param execution_role_arn: role ECS uses to pull the image and write logs.
    :param task_role_arn: role of the server (S3 access to the model repository).
    :param log_group: CloudWatch Logs group (``awslogs``); the server's log is read back from it.
    :param log_stream_prefix: ``awslogs-stream-prefix``.
    :param capacity_provider: a GPU capacity provider of the cluster (else ``launch_type``).
    :param launch_type: ``EC2`` by default.
    :param subnets: subnets of an ``awsvpc`` task.
    :param security_groups: its security groups (admit 8000-8002 from the workers).
    :param assign_public_ip: give an ``awsvpc`` task a public address (and use it as the endpoint).
    :param model_repository: where the server reads its models when not the path the DAG names:
        ``s3://bucket/prefix`` (read with the task role), or a path on a volume of your task definition.
    :param s3_endpoint_url: endpoint of an S3-compatible store (AWS S3 when ``None``).
    :param environment: more environment variables.
    :param extra_args: more tritonserver flags.
    :param log_verbose: Triton's ``--log-verbose`` level.
    :param startup_timeout: seconds from launch until the models must be ready (placement, image pull and
        model load included).
    :param stop_grace_period: seconds between SIGTERM and SIGKILL (at most 120 on ECS).
    :param lease_timeout: seconds the task may go without a lease renewal (its ``lease-renewed-at`` tag)
        before the reaper stops it; 0 for no lease. ECS has no deadline of its own: run the reaper DAG.
    """

    name = "ecs"

    def __init__(
        self,
        cluster: str,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        task_definition: str | None = None,
        container_name: str = "tritonserver",
        family: str = DEFAULT_FAMILY,
        image: str = TRITON_IMAGE,
        gpus: int = 1,
        cpu: str | None = None,
        memory: str | None = "16384",
        shm_size_mib: int = 1024,
        network_mode: str = "awsvpc",
        execution_role_arn: str | None = None,
        task_role_arn: str | None = None,
        log_group: str | None = None,
        log_stream_prefix: str = "triton",
        capacity_provider: str | None = None,
        launch_type: str | None = None,
        subnets: list[str] | None = None,
        security_groups: list[str] | None = None,
        assign_public_ip: bool = False,
        model_repository: str | None = None,
        s3_endpoint_url: str | None = None,
        environment: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        log_verbose: int = 0,
        startup_timeout: float = 1800,
        stop_grace_period: float = 30,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
    ) -> None:
        self.cluster = cluster
        self.lease_timeout = float(lease_timeout or 0)
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.task_definition = task_definition
        self.container_name = container_name
        self.network_mode = network_mode
        self.log_group = log_group
        self.log_stream_prefix = log_stream_prefix
        self.capacity_provider = capacity_provider
        self.launch_type = launch_type
        self.subnets = list(subnets or [])
        self.security_groups = list(security_groups or [])
        self.assign_public_ip = bool(assign_public_ip)
        self.model_repository = model_repository
        self.s3_endpoint_url = s3_endpoint_url
        self.environment = dict(environment or {})
        self.extra_args = list(extra_args or [])
        self.log_verbose = int(log_verbose)
        self.startup_timeout = float(startup_timeout)
        self.stop_grace_period = float(stop_grace_period)
        self.task_definition_options: dict[str, Any] = {
            "family": family,
            "image": image,
            "container_name": container_name,
            "gpus": int(gpus),
            "cpu": cpu,
            "memory": memory,
            "shm_size_mib": int(shm_size_mib),
            "network_mode": network_mode,
            "execution_role_arn": execution_role_arn,
            "task_role_arn": task_role_arn,
            "log_group": log_group,
            "log_stream_prefix": log_stream_prefix,
            "stop_grace_period": int(stop_grace_period),
        }

    @cached_property
    def ecs(self) -> Any:
        """The boto3 ECS client, from the amazon provider's ``EcsHook``."""
        from airflow.providers.amazon.aws.hooks.ecs import EcsHook

        return EcsHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name).conn

    @cached_property
    def logs(self) -> Any:
        from airflow.providers.amazon.aws.hooks.logs import AwsLogsHook

        return AwsLogsHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name).conn

    @cached_property
    def ec2(self) -> Any:
        from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

        return EC2Hook(
            aws_conn_id=self.aws_conn_id, region_name=self.region_name, api_type="client_type"
        ).conn

    # ------------------------------------------------------------------ launch

    def task_definition_spec(self) -> dict[str, Any]:
        """:func:`build_task_definition` with this runtime's options."""
        return build_task_definition(region_name=self.ecs.meta.region_name, **self.task_definition_options)

    def ensure_task_definition(self) -> str:
        """The task definition to run: ``task_definition``, or ours, registered when missing or changed."""
        if self.task_definition:
            return self.task_definition
        spec = self.task_definition_spec()
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        try:
            current = self.ecs.describe_task_definition(taskDefinition=spec["family"], include=["TAGS"])
            tags = {t["key"]: t["value"] for t in current.get("tags", [])}
            definition = current["taskDefinition"]
            if definition.get("status") == "ACTIVE" and tags.get(SPEC_HASH_TAG) == digest:
                return definition["taskDefinitionArn"]
        except self.ecs.exceptions.ClientException:
            pass  # no such family yet
        registered = self.ecs.register_task_definition(**spec, tags=[{"key": SPEC_HASH_TAG, "value": digest}])
        arn = registered["taskDefinition"]["taskDefinitionArn"]
        log.info("Registered ECS task definition %s.", arn)
        return arn

    def run_task_spec(
        self,
        task_definition: str,
        server_id: str,
        model_repository: str,
        models: list[str] | None,
        owner: ServerOwner | None,
    ) -> dict[str, Any]:
        """:func:`build_run_task` with this runtime's options."""
        repository = self.model_repository or model_repository
        if repository.startswith("s3://"):
            repository = triton_s3_path(repository, self.s3_endpoint_url)
        elif not (is_remote_repository(repository) or repository.startswith("/")):
            raise ValueError(
                f"Model repository {repository!r}: the ecs runtime needs s3:// or an absolute path."
            )
        command = tritonserver_command(
            repository, server_id, models, log_verbose=self.log_verbose, extra_args=self.extra_args
        )
        return build_run_task(
            cluster=self.cluster,
            task_definition=task_definition,
            container_name=self.container_name,
            server_id=server_id,
            command=command,
            owner=owner,
            environment=self.environment,
            capacity_provider=self.capacity_provider,
            launch_type=self.launch_type,
            network_mode=self.network_mode,
            subnets=self.subnets,
            security_groups=self.security_groups,
            assign_public_ip=self.assign_public_ip,
            lease_timeout=self.lease_timeout,
        )

    def launch(
        self, model_repository: str, models: list[str] | None = None, owner: ServerOwner | None = None
    ) -> ServerInfo:
        """Run the task; return at once (the address is filled in by :meth:`refresh` once ECS has one)."""
        from botocore.exceptions import BotoCoreError, ClientError

        server_id = new_server_id()
        try:
            task_definition = self.ensure_task_definition()
            kwargs = self.run_task_spec(task_definition, server_id, str(model_repository), models, owner)
            response = self.ecs.run_task(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise ServerStartError(f"ECS could not run Triton server {server_id}: {exc}") from exc
        tasks = response.get("tasks") or []
        if not tasks:
            failures = (
                "; ".join(
                    f"{f.get('arn', '')} {f.get('reason')} {f.get('detail', '')}".strip()
                    for f in response.get("failures") or []
                )
                or "no task was placed"
            )
            raise ServerStartError(
                f"ECS could not place Triton server {server_id} on cluster {self.cluster}: {failures}. "
                "GPU tasks need GPU container instances (a GPU capacity provider, or EC2 instances with "
                "free GPUs)."
            )
        task = tasks[0]
        task_id = task["taskArn"].rsplit("/", 1)[-1]
        info = ServerInfo(
            runtime=self.name,
            grpc_url="",
            http_url="",
            metrics_url="",
            handle={
                "server_id": server_id,
                "cluster": self.cluster,
                "task_arn": task["taskArn"],
                "task_definition": task.get("taskDefinitionArn", task_definition),
                "container_name": self.container_name,
                "log_group": self.log_group,
                "log_stream": f"{self.log_stream_prefix}/{self.container_name}/{task_id}",
                "owner": owner.to_dict() if owner else None,
                "started_at": time.time(),
            },
        )
        try:
            info = self._with_address(info, task)
        except Exception:
            self.stop(info)
            raise
        log.info(
            "ECS task %s runs Triton server %s; gRPC %s",
            task["taskArn"],
            server_id,
            info.grpc_url or "(pending)",
        )
        return info

    def refresh(self, info: ServerInfo) -> ServerInfo:
        """Fill in the task's address once ECS has attached it."""
        if info.http_url:
            return info
        task = self._describe(info)
        return self._with_address(info, task) if task else info

    def _with_address(self, info: ServerInfo, task: dict[str, Any]) -> ServerInfo:
        host = self._task_host(task)
        if not host:
            return info
        return ServerInfo(
            runtime=info.runtime,
            grpc_url=f"{host}:{GRPC_PORT}",
            http_url=f"http://{host}:{HTTP_PORT}",
            metrics_url=f"http://{host}:{METRICS_PORT}/metrics",
            handle={**info.handle, "host": host},
        )

    def _task_host(self, task: dict[str, Any]) -> str | None:
        if self.network_mode == "awsvpc":
            for attachment in task.get("attachments") or []:
                details = {d["name"]: d.get("value") for d in attachment.get("details") or []}
                if self.assign_public_ip and details.get("networkInterfaceId"):
                    public = self._public_ip(details["networkInterfaceId"])
                    if public:
                        return public
                if details.get("privateIPv4Address"):
                    return details["privateIPv4Address"]
            return None
        instance_arn = task.get("containerInstanceArn")
        if not instance_arn:
            return None
        instances = self.ecs.describe_container_instances(
            cluster=self.cluster, containerInstances=[instance_arn]
        )
        ids = [i["ec2InstanceId"] for i in instances.get("containerInstances") or []]
        if not ids:
            return None
        reservations = self.ec2.describe_instances(InstanceIds=ids)["Reservations"]
        for reservation in reservations:
            for instance in reservation["Instances"]:
                return instance.get("PrivateIpAddress")
        return None

    def _public_ip(self, eni_id: str) -> str | None:
        interfaces = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"]
        for interface in interfaces:
            return (interface.get("Association") or {}).get("PublicIp")
        return None

    # ------------------------------------------------------------------ stop and inspect

    def _describe(self, info: ServerInfo) -> dict[str, Any] | None:
        response = self.ecs.describe_tasks(cluster=info.handle["cluster"], tasks=[info.handle["task_arn"]])
        tasks = response.get("tasks") or []
        return tasks[0] if tasks else None

    def stop(self, info: ServerInfo) -> bool:
        """Stop the task (ECS sends SIGTERM, then SIGKILL after the container's ``stopTimeout``).

        :returns: ``False`` when it had already stopped or is unknown to ECS.
        """
        task = self._describe(info)
        arn = info.handle["task_arn"]
        if task is None or task.get("lastStatus") == "STOPPED" or task.get("desiredStatus") == "STOPPED":
            log.info(
                "ECS task %s of Triton server %s was already stopped.", arn, info.handle.get("server_id")
            )
            return False
        self.ecs.stop_task(cluster=info.handle["cluster"], task=arn, reason="Stopped by airflow-batch-infer")
        log.info("Stopped ECS task %s (Triton server %s).", arn, info.handle.get("server_id"))
        return True

    def is_running(self, info: ServerInfo) -> bool:
        """Whether the task exists and has not stopped (or been asked to)."""
        task = self._describe(info)
        return bool(task and task.get("lastStatus") != "STOPPED" and task.get("desiredStatus") != "STOPPED")

    def failure_reason(self, info: ServerInfo) -> str | None:
        """Why the task will never serve: unknown to ECS, or stopped (with ECS's reason and exit codes)."""
        task = self._describe(info)
        if task is None:
            return "ECS does not know its task"
        if task.get("lastStatus") != "STOPPED" and task.get("desiredStatus") != "STOPPED":
            return None
        return f"its task stopped: {task_summary(task)}"

    def log_tail(self, info: ServerInfo, lines: int = 40) -> str:
        """The task's status and, with ``awslogs``, the container's last log lines from CloudWatch Logs."""
        parts = []
        try:
            task = self._describe(info)
            parts.append(
                f"ECS task {info.handle['task_arn']}: " + (task_summary(task) if task else "unknown")
            )
        except Exception as exc:
            parts.append(f"(task status unavailable: {exc})")
        group, stream = info.handle.get("log_group"), info.handle.get("log_stream")
        if group and stream:
            try:
                events = self.logs.get_log_events(
                    logGroupName=group, logStreamName=stream, limit=lines, startFromHead=False
                )["events"]
                parts.extend(e["message"].rstrip("\n") for e in events[-lines:])
            except Exception as exc:
                parts.append(f"(no log in {group}/{stream} yet: {exc})")
        else:
            parts.append("(no log_group: configure awslogs to see the server's log here)")
        return "\n".join(parts)

    def list_servers(self) -> list[ServerInfo]:
        """Running tasks of the cluster started by this package (``startedBy``), with their owners."""
        arns: list[str] = []
        for page in self.ecs.get_paginator("list_tasks").paginate(
            cluster=self.cluster, startedBy=STARTED_BY, desiredStatus="RUNNING"
        ):
            arns.extend(page.get("taskArns") or [])
        servers = []
        for start in range(0, len(arns), 100):
            described = self.ecs.describe_tasks(
                cluster=self.cluster, tasks=arns[start : start + 100], include=["TAGS"]
            )
            for task in described.get("tasks") or []:
                tags = {t["key"]: t["value"] for t in task.get("tags") or []}
                owner = owner_from_overrides(task) or ServerOwner.from_labels(tags)
                created = task.get("createdAt")
                servers.append(
                    ServerInfo(
                        runtime=self.name,
                        grpc_url="",
                        http_url="",
                        metrics_url="",
                        handle={
                            "server_id": tags.get(SERVER_ID_KEY, ""),
                            "cluster": self.cluster,
                            "task_arn": task["taskArn"],
                            "owner": owner.to_dict() if owner else None,
                            "started_at": created.timestamp() if hasattr(created, "timestamp") else 0.0,
                            "state": task.get("lastStatus"),
                            **lease_from_labels(tags),
                        },
                    )
                )
        return servers

    def renew_lease(self, info: ServerInfo) -> bool:
        """Renew the task's lease: set its ``airflow-batch-infer/lease-renewed-at`` tag to now."""
        if not self.lease_timeout or not info.handle.get("task_arn"):
            return False
        self.ecs.tag_resource(
            resourceArn=info.handle["task_arn"],
            tags=[{"key": LEASE_RENEWED_KEY, "value": f"{time.time():.0f}"}],
        )
        return True
