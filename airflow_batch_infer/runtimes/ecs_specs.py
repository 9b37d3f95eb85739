"""The ecs runtime's options (:class:`TaskOptions`) and requests, as pure functions: the task definition
and ``run_task``'s arguments.

GPU resource requirements, shared memory, ulimits, static ports, ``awslogs``, the tritonserver command,
tags (owner, lease) and ``startedBy`` for the reaper, no public IP unless asked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from airflow_batch_infer.runtimes.containers import PORTS, ULIMITS, ContainerOptions, TritonContainer

#: ``startedBy`` of every task this runtime runs (ECS allows 36 characters): the reaper lists by it.
STARTED_BY = "airflow-batch-infer"
#: The exact owner, as JSON, in the container's environment (tag values allow fewer characters).
OWNER_ENV = "AIRFLOW_BATCH_INFER_OWNER"
SPEC_HASH_TAG = "airflow-batch-infer/spec-hash"
DEFAULT_FAMILY = "airflow-batch-infer-triton"
_TAG_CHARS = re.compile(r"[^\w\s+\-=.:/@]")


def ecs_tag_value(value: str) -> str:
    """``value`` with only the characters ECS allows in tags (letters, digits, spaces, ``+-=._:/@``)."""
    return _TAG_CHARS.sub("_", value)[:256]


@dataclass(kw_only=True)
class TaskOptions(ContainerOptions):
    """A server's ECS task: :class:`~.containers.ContainerOptions` and these.

    A repository path is inside the container (a volume of your task definition); ``s3://`` is read with
    the task role. A lease is kept in the task's ``lease-renewed-at`` tag: ECS has no deadline of its own,
    so run the reaper DAG.

    :param gpus: GPUs reserved for the container (0 for a CPU-only server).
    :param family: family of the registered task definition.
    :param container_name: the Triton container's name.
    :param cpu: task CPU units (``"4096"`` is 4 vCPU); none when ``None``.
    :param memory: task memory in MiB.
    :param shm_size_mib: size of ``/dev/shm`` in MiB.
    :param network_mode: ``awsvpc`` (the task gets its own address), ``host`` or ``bridge`` (ports
        8000-8002 are static on the host).
    :param execution_role_arn: role ECS uses to pull the image and write logs.
    :param task_role_arn: role of the server itself (reads the model repository on S3).
    :param log_group: CloudWatch Logs group for ``awslogs`` (no log driver when ``None``); the server's log
        is read back from it.
    :param log_stream_prefix: ``awslogs-stream-prefix``.
    :param capacity_provider: a GPU capacity provider of the cluster (else ``launch_type``).
    :param launch_type: ``EC2`` when neither is given.
    :param subnets: subnets of an ``awsvpc`` task.
    :param security_groups: its security groups (must admit 8000-8002 from the workers).
    :param assign_public_ip: give an ``awsvpc`` task a public address (and use it as the endpoint).
    """

    runtime: ClassVar[str] = "ecs"

    gpus: int = 1
    family: str = DEFAULT_FAMILY
    container_name: str = "tritonserver"
    cpu: str | None = None
    memory: str | None = "16384"
    shm_size_mib: int = 1024
    network_mode: str = "awsvpc"
    execution_role_arn: str | None = None
    task_role_arn: str | None = None
    log_group: str | None = None
    log_stream_prefix: str = "triton"
    capacity_provider: str | None = None
    launch_type: str | None = None
    subnets: list[str] = field(default_factory=list)
    security_groups: list[str] = field(default_factory=list)
    assign_public_ip: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gpus = int(self.gpus)  # type: ignore[arg-type]
        self.subnets = list(self.subnets or [])
        self.security_groups = list(self.security_groups or [])


def build_task_definition(options: TaskOptions, region_name: str | None = None) -> dict[str, Any]:
    """Keyword arguments of ``register_task_definition`` for a GPU Triton task: a pure function.

    :param options: the runtime's options.
    :param region_name: region of the log group.
    """
    container: dict[str, Any] = {
        "name": options.container_name,
        "image": options.image,
        "essential": True,
        "command": ["tritonserver", "--model-repository=/models"],  # replaced at run time
        "portMappings": [
            {"containerPort": port, "hostPort": port, "protocol": "tcp", "name": key}
            for key, port in PORTS.items()
        ],
        "linuxParameters": {"sharedMemorySize": int(options.shm_size_mib)},
        "ulimits": [
            {"name": name, "softLimit": soft, "hardLimit": hard} for name, (soft, hard) in ULIMITS.items()
        ],
        "stopTimeout": max(2, min(int(options.stop_grace_period), 120)),
    }
    if options.gpus:
        container["resourceRequirements"] = [{"type": "GPU", "value": str(int(options.gpus))}]
    if options.memory:
        container["memoryReservation"] = int(options.memory)  # the soft limit ECS places by, on EC2
    if options.log_group:
        logs = {"awslogs-group": options.log_group, "awslogs-stream-prefix": options.log_stream_prefix}
        if region_name:
            logs["awslogs-region"] = region_name
        container["logConfiguration"] = {"logDriver": "awslogs", "options": logs}
    spec: dict[str, Any] = {
        "family": options.family,
        "containerDefinitions": [container],
        "requiresCompatibilities": ["EC2"],
        "networkMode": options.network_mode,
    }
    if options.cpu:
        spec["cpu"] = str(options.cpu)
    if options.memory:
        spec["memory"] = str(options.memory)
    if options.execution_role_arn:
        spec["executionRoleArn"] = options.execution_role_arn
    if options.task_role_arn:
        spec["taskRoleArn"] = options.task_role_arn
    return spec


def build_run_task(
    options: TaskOptions, container: TritonContainer, *, cluster: str, task_definition: str
) -> dict[str, Any]:
    """Keyword arguments of ``run_task`` for one server: a pure function.

    Its command and environment override the task definition's; its tags name the owner and the lease,
    and the owner is in its environment too, exactly (:data:`OWNER_ENV`).

    :param options: the runtime's options.
    :param container: the server's container (:meth:`~.containers.ContainerOptions.describe`).
    :param cluster: the ECS cluster.
    :param task_definition: family, ``family:revision`` or ARN.
    """
    env = dict(container.environment)
    if container.owner is not None:
        env[OWNER_ENV] = json.dumps(container.owner.to_dict(), sort_keys=True)
    tags = {**container.labels, **container.lease_labels()}
    kwargs: dict[str, Any] = {
        "cluster": cluster,
        "taskDefinition": task_definition,
        "count": 1,
        "startedBy": STARTED_BY,
        "tags": [{"key": k, "value": ecs_tag_value(v)} for k, v in tags.items()],
        "overrides": {
            "containerOverrides": [
                {
                    "name": options.container_name,
                    "command": container.command,
                    "environment": [{"name": k, "value": str(v)} for k, v in sorted(env.items())],
                }
            ]
        },
    }
    if options.capacity_provider:
        strategy = {"capacityProvider": options.capacity_provider, "weight": 1, "base": 0}
        kwargs["capacityProviderStrategy"] = [strategy]
    else:
        kwargs["launchType"] = options.launch_type or "EC2"
    if options.network_mode == "awsvpc":
        if not options.subnets:
            raise ValueError("An awsvpc ECS task needs `subnets` (and usually `security_groups`).")
        kwargs["networkConfiguration"] = {
            "awsvpcConfiguration": {
                "subnets": list(options.subnets),
                "securityGroups": list(options.security_groups),
                "assignPublicIp": "ENABLED" if options.assign_public_ip else "DISABLED",
            }
        }
    return kwargs
