"""The ecs runtime's requests, as pure functions: the task definition and ``run_task``'s arguments.

GPU resource requirements, shared memory, ulimits, static ports, ``awslogs``, the tritonserver command,
tags (owner, lease) and ``startedBy`` for the reaper, no public IP unless asked.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from airflow_batch_infer.runtimes.containers import (
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    TRITON_IMAGE,
)
from airflow_batch_infer.runtimes.labels import (
    LEASE_RENEWED_KEY,
    ServerOwner,
    server_labels,
)

#: ``startedBy`` of every task this runtime runs (ECS allows 36 characters): the reaper lists by it.
STARTED_BY = "airflow-batch-infer"
#: The exact owner, as JSON, in the container's environment (tag values allow fewer characters).
OWNER_ENV = "AIRFLOW_BATCH_INFER_OWNER"
SPEC_HASH_TAG = "airflow-batch-infer/spec-hash"
DEFAULT_FAMILY = "airflow-batch-infer-triton"
_PORTS = {"http": HTTP_PORT, "grpc": GRPC_PORT, "metrics": METRICS_PORT}
_TAG_CHARS = re.compile(r"[^\w\s+\-=.:/@]")


def ecs_tag_value(value: str) -> str:
    """``value`` with only the characters ECS allows in tags (letters, digits, spaces, ``+-=._:/@``)."""
    return _TAG_CHARS.sub("_", value)[:256]


def build_task_definition(
    *,
    family: str = DEFAULT_FAMILY,
    image: str = TRITON_IMAGE,
    container_name: str = "tritonserver",
    gpus: int = 1,
    cpu: str | None = None,
    memory: str | None = "16384",
    shm_size_mib: int = 1024,
    network_mode: str = "awsvpc",
    execution_role_arn: str | None = None,
    task_role_arn: str | None = None,
    log_group: str | None = None,
    log_stream_prefix: str = "triton",
    region_name: str | None = None,
    stop_grace_period: int = 30,
) -> dict[str, Any]:
    """Keyword arguments of ``register_task_definition`` for a GPU Triton task: a pure function.

    :param family: the task definition family.
    :param image: the tritonserver image.
    :param container_name: the container's name (run-time overrides name it).
    :param gpus: GPUs reserved for the container (0: none).
    :param cpu: task CPU units (``"4096"`` is 4 vCPU); none when ``None``.
    :param memory: task memory in MiB.
    :param shm_size_mib: size of ``/dev/shm`` in MiB.
    :param network_mode: ``awsvpc`` (the task gets its own address), ``host`` or ``bridge``.
    :param execution_role_arn: role ECS uses to pull the image and write logs.
    :param task_role_arn: role of the server itself (reads the model repository on S3).
    :param log_group: CloudWatch Logs group for ``awslogs`` (no log driver when ``None``).
    :param log_stream_prefix: ``awslogs-stream-prefix``.
    :param region_name: region of the log group.
    :param stop_grace_period: seconds between SIGTERM and SIGKILL on stop (ECS allows up to 120).
    """
    container: dict[str, Any] = {
        "name": container_name,
        "image": image,
        "essential": True,
        "command": ["tritonserver", "--model-repository=/models"],  # replaced at run time
        "portMappings": [
            {"containerPort": port, "hostPort": port, "protocol": "tcp", "name": key}
            for key, port in _PORTS.items()
        ],
        "linuxParameters": {"sharedMemorySize": int(shm_size_mib)},
        "ulimits": [
            {"name": "memlock", "softLimit": -1, "hardLimit": -1},
            {"name": "stack", "softLimit": 67108864, "hardLimit": 67108864},
        ],
        "stopTimeout": max(2, min(int(stop_grace_period), 120)),
    }
    if gpus:
        container["resourceRequirements"] = [{"type": "GPU", "value": str(int(gpus))}]
    if memory:
        container["memoryReservation"] = int(memory)  # the soft limit ECS places by, on EC2
    if log_group:
        options = {"awslogs-group": log_group, "awslogs-stream-prefix": log_stream_prefix}
        if region_name:
            options["awslogs-region"] = region_name
        container["logConfiguration"] = {"logDriver": "awslogs", "options": options}
    spec: dict[str, Any] = {
        "family": family,
        "containerDefinitions": [container],
        "requiresCompatibilities": ["EC2"],
        "networkMode": network_mode,
    }
    if cpu:
        spec["cpu"] = str(cpu)
    if memory:
        spec["memory"] = str(memory)
    if execution_role_arn:
        spec["executionRoleArn"] = execution_role_arn
    if task_role_arn:
        spec["taskRoleArn"] = task_role_arn
    return spec


def build_run_task(
    *,
    cluster: str,
    task_definition: str,
    container_name: str,
    server_id: str,
    command: list[str],
    owner: ServerOwner | None = None,
    environment: dict[str, str] | None = None,
    capacity_provider: str | None = None,
    launch_type: str | None = None,
    network_mode: str = "awsvpc",
    subnets: list[str] | None = None,
    security_groups: list[str] | None = None,
    assign_public_ip: bool = False,
    lease_timeout: float = 0,
) -> dict[str, Any]:
    """Keyword arguments of ``run_task`` for one server: a pure function.

    :param cluster: the ECS cluster.
    :param task_definition: family, ``family:revision`` or ARN.
    :param container_name: the Triton container in the task definition.
    :param server_id: the server's id (``--id``, a tag).
    :param command: the tritonserver command line.
    :param owner: the task instance that starts it (tags, and exact in the environment).
    :param environment: more environment variables of the server.
    :param capacity_provider: a GPU capacity provider (else ``launch_type``).
    :param launch_type: ``EC2`` when neither is given.
    :param network_mode: the task definition's network mode (``awsvpc`` needs subnets).
    :param subnets: subnets of an ``awsvpc`` task.
    :param security_groups: security groups of an ``awsvpc`` task (must admit 8000-8002 from workers).
    :param assign_public_ip: give an ``awsvpc`` task a public address.
    :param lease_timeout: seconds without a lease renewal before the reaper stops the task (tags
        ``airflow-batch-infer/lease-timeout`` and ``lease-renewed-at``; 0 for no lease).
    """
    env = dict(environment or {})
    tags = server_labels(server_id, owner, lease_timeout)
    if lease_timeout and lease_timeout > 0:
        tags[LEASE_RENEWED_KEY] = f"{time.time():.0f}"
    if owner is not None:
        env[OWNER_ENV] = json.dumps(owner.to_dict(), sort_keys=True)
    kwargs: dict[str, Any] = {
        "cluster": cluster,
        "taskDefinition": task_definition,
        "count": 1,
        "startedBy": STARTED_BY,
        "tags": [{"key": k, "value": ecs_tag_value(v)} for k, v in tags.items()],
        "overrides": {
            "containerOverrides": [
                {
                    "name": container_name,
                    "command": command,
                    "environment": [{"name": k, "value": str(v)} for k, v in sorted(env.items())],
                }
            ]
        },
    }
    if capacity_provider:
        kwargs["capacityProviderStrategy"] = [{"capacityProvider": capacity_provider, "weight": 1, "base": 0}]
    else:
        kwargs["launchType"] = launch_type or "EC2"
    if network_mode == "awsvpc":
        if not subnets:
            raise ValueError("An awsvpc ECS task needs `subnets` (and usually `security_groups`).")
        kwargs["networkConfiguration"] = {
            "awsvpcConfiguration": {
                "subnets": list(subnets),
                "securityGroups": list(security_groups or []),
                "assignPublicIp": "ENABLED" if assign_public_ip else "DISABLED",
            }
        }
    return kwargs


def owner_from_overrides(task: dict[str, Any]) -> ServerOwner | None:
    for container in (task.get("overrides") or {}).get("containerOverrides") or []:
        for variable in container.get("environment") or []:
            if variable.get("name") == OWNER_ENV:
                try:
                    return ServerOwner.from_dict(json.loads(variable.get("value") or "{}"))
                except ValueError:
                    return None
    return None


def task_summary(task: dict[str, Any]) -> str:
    parts = [f"last status {task.get('lastStatus')}"]
    if task.get("stoppedReason"):
        parts.append(f"stopped: {task.get('stopCode', '')} {task['stoppedReason']}".replace("  ", " "))
    for container in task.get("containers") or []:
        if container.get("exitCode") is not None or container.get("reason"):
            reason = container.get("reason") or ""
            parts.append(
                f"container {container.get('name')} exit code {container.get('exitCode')} {reason}".rstrip()
            )
    return "; ".join(parts)
