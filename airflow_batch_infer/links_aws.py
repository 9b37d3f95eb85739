"""The ECS server's links, on the amazon provider's link classes: present where the ``amazon`` extra is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.amazon.aws.links.base_aws import BASE_AWS_CONSOLE_LINK, BaseAwsLink
from airflow.providers.amazon.aws.links.logs import CloudWatchEventsLink

from airflow_batch_infer.links import return_value

if TYPE_CHECKING:
    from airflow.sdk.types import TaskInstanceKey


def _ecs_task(ti_key: TaskInstanceKey) -> dict[str, str] | None:
    """Region, partition, cluster, task id and log of the server's ECS task, from its ARN
    (``arn:<partition>:ecs:<region>:<account>:task/<cluster>/<task id>``)."""
    handle = return_value(ti_key).get("handle") or {}
    arn = str(handle.get("task_arn") or "")
    fields = arn.split(":", 5)
    if len(fields) != 6 or fields[2] != "ecs":
        return None
    _, cluster, task_id = [*fields[5].split("/"), "", ""][:3]
    return {
        "aws_domain": BaseAwsLink.get_aws_domain(fields[1]) or "aws.amazon.com",
        "region_name": fields[3],
        "cluster_name": cluster or str(handle.get("cluster") or ""),
        "task_id": task_id,
        "log_group": str(handle.get("log_group") or ""),
        "log_stream": str(handle.get("log_stream") or ""),
    }


class EcsTaskLink(BaseAwsLink):
    """The server's ECS task in the AWS console (the amazon provider's console link, built from the ARN)."""

    name = "ECS task"
    key = "batch_infer_ecs_task"
    format_str = (
        BASE_AWS_CONSOLE_LINK + "/ecs/v2/clusters/{cluster_name}/tasks/{task_id}?region={region_name}"
    )

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        task = _ecs_task(ti_key)
        return self.format_link(**task) if task else ""


class TritonCloudWatchLogLink(CloudWatchEventsLink):
    """The ECS server's log stream in CloudWatch Logs (the amazon provider's ``CloudWatchEventsLink``)."""

    name = "Triton server log (CloudWatch)"
    key = "batch_infer_cloudwatch_log"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        task = _ecs_task(ti_key)
        if not task or not task["log_group"]:
            return ""
        return self.format_link(
            aws_domain=task["aws_domain"],
            awslogs_region=task["region_name"],
            awslogs_group=task["log_group"],
            awslogs_stream_name=task["log_stream"],
        )
