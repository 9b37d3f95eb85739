"""The ecs runtime: an ECS task on GPU capacity (EC2 container instances) running NVIDIA's ``tritonserver``.

Calls ECS through the amazon provider's :class:`~airflow.providers.amazon.aws.hooks.ecs.EcsHook` (CloudWatch
Logs through ``AwsLogsHook`` for the server's log). :func:`build_task_definition` and :func:`build_run_task`
(:mod:`.ecs_specs`, re-exported here) are pure functions returning the keyword arguments of
``register_task_definition`` and ``run_task``; :mod:`.ecs_tasks` reads tasks back (address, status, the
listing). Without a ``task_definition`` of your own, the runtime
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

from airflow_batch_infer.runtimes.base import ServerInfo, ServerStartError, TritonRuntime
from airflow_batch_infer.runtimes.containers import PORTS
from airflow_batch_infer.runtimes.ecs_specs import (
    OWNER_ENV,
    SPEC_HASH_TAG,
    STARTED_BY,
    TaskOptions,
    build_run_task,
    build_task_definition,
)
from airflow_batch_infer.runtimes.ecs_tasks import (
    is_stopped,
    listed_servers,
    placement_failures,
    task_host,
    task_summary,
)
from airflow_batch_infer.runtimes.labels import LEASE_RENEWED_KEY, ServerOwner, new_server_id

__all__ = [
    "OWNER_ENV",
    "STARTED_BY",
    "EcsTritonRuntime",
    "TaskOptions",
    "build_run_task",
    "build_task_definition",
]

log = logging.getLogger(__name__)


class EcsTritonRuntime(TritonRuntime):
    """Runs NVIDIA's ``tritonserver`` image as an ECS task on GPU container instances.

    :param cluster: the ECS cluster (name or ARN).
    :param aws_conn_id: the ``aws`` connection.
    :param region_name: the region; the connection's when ``None``.
    :param task_definition: a task definition of your own (its ``container_name`` container runs
        tritonserver; the command is set at run time); registered from the options when ``None``.
    :param startup_timeout: seconds from launch until the models must be ready (placement, image pull and
        model load included).
    :param options: the task's options, :class:`~airflow_batch_infer.runtimes.ecs_specs.TaskOptions`
        (``image``, ``gpus``, ``cpu``, ``memory``, ``network_mode``, ``subnets``, ``security_groups``,
        ``execution_role_arn``, ``task_role_arn``, ``log_group``, ``capacity_provider``,
        ``model_repository``, ``environment``, ``stop_grace_period`` (at most 120 on ECS),
        ``lease_timeout``, ...).
    """

    name = "ecs"

    def __init__(
        self,
        cluster: str,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        task_definition: str | None = None,
        startup_timeout: float = 1800,
        **options: Any,
    ) -> None:
        self.options = TaskOptions(**options)
        self.lease_timeout = self.options.lease_timeout
        self.cluster = cluster
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.task_definition = task_definition
        self.startup_timeout = float(startup_timeout)

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
        return build_task_definition(self.options, region_name=self.ecs.meta.region_name)

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
        container = self.options.describe(server_id, model_repository, models, owner)
        return build_run_task(self.options, container, cluster=self.cluster, task_definition=task_definition)

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
            raise ServerStartError(
                f"ECS could not place Triton server {server_id} on cluster {self.cluster}: "
                f"{placement_failures(response)}. "
                "GPU tasks need GPU container instances (a GPU capacity provider, or EC2 instances with "
                "free GPUs)."
            )
        task, options = tasks[0], self.options
        task_id = task["taskArn"].rsplit("/", 1)[-1]
        info = ServerInfo(
            self.name,
            handle={
                "server_id": server_id,
                "cluster": self.cluster,
                "task_arn": task["taskArn"],
                "task_definition": task.get("taskDefinitionArn", task_definition),
                "container_name": options.container_name,
                "log_group": options.log_group,
                "log_stream": f"{options.log_stream_prefix}/{options.container_name}/{task_id}",
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
        options = self.options
        host = task_host(
            task, self.ecs, self.ec2, self.cluster, options.network_mode, options.assign_public_ip
        )
        return ServerInfo.at(self.name, host, PORTS, {**info.handle, "host": host}) if host else info

    # ------------------------------------------------------------------ stop and inspect

    def _describe(self, info: ServerInfo) -> dict[str, Any] | None:
        response = self.ecs.describe_tasks(cluster=info.handle["cluster"], tasks=[info.handle["task_arn"]])
        tasks = response.get("tasks") or []
        return tasks[0] if tasks else None

    def stop(self, info: ServerInfo) -> bool:
        """Stop the task (ECS sends SIGTERM, then SIGKILL after the container's ``stopTimeout``).

        :returns: ``False`` when it had already stopped or is unknown to ECS.
        """
        arn = info.handle["task_arn"]
        if is_stopped(self._describe(info)):
            log.info(
                "ECS task %s of Triton server %s was already stopped.", arn, info.handle.get("server_id")
            )
            return False
        self.ecs.stop_task(cluster=info.handle["cluster"], task=arn, reason="Stopped by airflow-batch-infer")
        log.info("Stopped ECS task %s (Triton server %s).", arn, info.handle.get("server_id"))
        return True

    def is_running(self, info: ServerInfo) -> bool:
        """Whether the task exists and has not stopped (or been asked to)."""
        return not is_stopped(self._describe(info))

    def failure_reason(self, info: ServerInfo) -> str | None:
        """Why the task will never serve: unknown to ECS, or stopped (with ECS's reason and exit codes)."""
        task = self._describe(info)
        if task is None:
            return "ECS does not know its task"
        if not is_stopped(task):
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
        return listed_servers(self.ecs, self.cluster)

    def renew_lease(self, info: ServerInfo) -> bool:
        """Renew the task's lease: set its ``airflow-batch-infer/lease-renewed-at`` tag to now."""
        if not self.lease_timeout or not info.handle.get("task_arn"):
            return False
        self.ecs.tag_resource(
            resourceArn=info.handle["task_arn"],
            tags=[{"key": LEASE_RENEWED_KEY, "value": f"{time.time():.0f}"}],
        )
        return True
