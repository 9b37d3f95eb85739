"""The ecs runtime's tasks read back: a task's address, why it stopped or was never placed, its owner, and
the listing of this package's tasks that the reaper and a retried start work from.
"""

from __future__ import annotations

import json
from typing import Any

from airflow_batch_infer.runtimes.base import ServerInfo
from airflow_batch_infer.runtimes.ecs_specs import OWNER_ENV, STARTED_BY
from airflow_batch_infer.runtimes.labels import SERVER_ID_KEY, ServerOwner, lease_from_labels


def is_stopped(task: dict[str, Any] | None) -> bool:
    """Whether ``task`` is unknown (``None``), stopped, or asked to stop."""
    return task is None or task.get("lastStatus") == "STOPPED" or task.get("desiredStatus") == "STOPPED"


def task_summary(task: dict[str, Any]) -> str:
    """One line on a task: its last status, why it stopped, its containers' exit codes."""
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


def placement_failures(response: dict[str, Any]) -> str:
    """Why ``run_task`` placed no task, from its ``failures``."""
    return (
        "; ".join(
            f"{f.get('arn', '')} {f.get('reason')} {f.get('detail', '')}".strip()
            for f in response.get("failures") or []
        )
        or "no task was placed"
    )


def task_host(
    task: dict[str, Any], ecs: Any, ec2: Any, cluster: str, network_mode: str, public_ip: bool = False
) -> str | None:
    """The address the workers reach a task at (``None`` until ECS has attached one).

    :param task: the task, as ``describe_tasks`` gives it.
    :param ecs: the boto3 ECS client.
    :param ec2: the boto3 EC2 client.
    :param cluster: the task's cluster.
    :param network_mode: ``awsvpc`` (the task's own network interface), else its container instance's.
    :param public_ip: an ``awsvpc`` task's public address rather than its private one.
    """
    if network_mode == "awsvpc":
        for attachment in task.get("attachments") or []:
            details = {d["name"]: d.get("value") for d in attachment.get("details") or []}
            if public_ip and details.get("networkInterfaceId"):
                interfaces = ec2.describe_network_interfaces(
                    NetworkInterfaceIds=[details["networkInterfaceId"]]
                )
                for interface in interfaces["NetworkInterfaces"]:
                    if (interface.get("Association") or {}).get("PublicIp"):
                        return interface["Association"]["PublicIp"]
            if details.get("privateIPv4Address"):
                return details["privateIPv4Address"]
        return None
    instance_arn = task.get("containerInstanceArn")
    if not instance_arn:
        return None
    instances = ecs.describe_container_instances(cluster=cluster, containerInstances=[instance_arn])
    ids = [i["ec2InstanceId"] for i in instances.get("containerInstances") or []]
    if not ids:
        return None
    for reservation in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
        for instance in reservation["Instances"]:
            return instance.get("PrivateIpAddress")
    return None


def owner_from_overrides(task: dict[str, Any]) -> ServerOwner | None:
    """The exact owner that :func:`~.ecs_specs.build_run_task` put in the container's environment."""
    for container in (task.get("overrides") or {}).get("containerOverrides") or []:
        for variable in container.get("environment") or []:
            if variable.get("name") == OWNER_ENV:
                try:
                    return ServerOwner.from_dict(json.loads(variable.get("value") or "{}"))
                except ValueError:
                    return None
    return None


def listed_servers(ecs: Any, cluster: str) -> list[ServerInfo]:
    """Running tasks of ``cluster`` started by this package (``startedBy``), with their owners and leases.

    :param ecs: the boto3 ECS client.
    :param cluster: the cluster (name or ARN).
    """
    arns: list[str] = []
    for page in ecs.get_paginator("list_tasks").paginate(
        cluster=cluster, startedBy=STARTED_BY, desiredStatus="RUNNING"
    ):
        arns.extend(page.get("taskArns") or [])
    servers = []
    for start in range(0, len(arns), 100):
        described = ecs.describe_tasks(cluster=cluster, tasks=arns[start : start + 100], include=["TAGS"])
        for task in described.get("tasks") or []:
            tags = {t["key"]: t["value"] for t in task.get("tags") or []}
            owner = owner_from_overrides(task) or ServerOwner.from_labels(tags)
            created = task.get("createdAt")
            handle = {
                "server_id": tags.get(SERVER_ID_KEY, ""),
                "cluster": cluster,
                "task_arn": task["taskArn"],
                "owner": owner.to_dict() if owner else None,
                "started_at": created.timestamp() if hasattr(created, "timestamp") else 0.0,
                "state": task.get("lastStatus"),
                **lease_from_labels(tags),
            }
            servers.append(ServerInfo("ecs", handle=handle))
    return servers
