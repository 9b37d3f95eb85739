"""Extra links in the UI: the server's metrics and log, its Pod or ECS task, the output table, the run report.

Airflow 3 resolves each link on the worker when the task ends and keeps the URL in XCom. The server links
read the start task's return value (the fleet: the first server's endpoints and handle); the persist links
read the persist task's summary. A link that does not apply to a run (a Pod link for a local server) is
empty, and the UI shows it greyed out.

Local files (a local server's log, a report on local disk) are linked as ``file://`` URLs: they name the
file on the worker's host, which a browser opens only when it runs there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseOperatorLink, conf
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk.types import TaskInstanceKey

#: ``[batch_infer] kubernetes_dashboard_url``: a Pod's page in your cluster's dashboard, with ``{namespace}``
#: and ``{pod_name}`` placeholders, e.g. ``https://dashboard.example/#/pod/{namespace}/{pod_name}``.
DASHBOARD_OPTION = ("batch_infer", "kubernetes_dashboard_url")
REPORT_FILE = "report.html"


def return_value(ti_key: TaskInstanceKey) -> dict[str, Any]:
    value = XCom.get_value(ti_key=ti_key, key="return_value")
    return value if isinstance(value, dict) else {}


def _file_or_console_url(location: str) -> str:
    """A browsable URL of a location: ``file://`` for a local path, the S3 console for ``s3://``."""
    parts = urlsplit(location)
    if not parts.scheme:
        return "file://" + quote(location)
    if parts.scheme in ("s3", "s3a"):
        bucket = parts.netloc.rpartition("@")[2]  # s3://conn_id@bucket/key
        return f"https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={quote(parts.path.lstrip('/'))}"
    return location


class TritonMetricsLink(BaseOperatorLink):
    """The first server's Prometheus metrics page (``/metrics``)."""

    name = "Triton metrics"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        return str(return_value(ti_key).get("metrics_url") or "")


class TritonServerLogLink(BaseOperatorLink):
    """A local server's log file (``file://`` on the worker host); the Pod and ECS links cover the others."""

    name = "Triton server log"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        log_path = (return_value(ti_key).get("handle") or {}).get("log_path")
        return "file://" + quote(str(log_path)) if log_path else ""


class KubernetesPodLink(BaseOperatorLink):
    """The server's Pod in the cluster's dashboard (``[batch_infer] kubernetes_dashboard_url``)."""

    name = "Kubernetes pod"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        handle = return_value(ti_key).get("handle") or {}
        template = conf.get(*DASHBOARD_OPTION, fallback="")
        if not handle.get("pod_name") or not template:
            return ""
        return template.format(namespace=quote(handle["namespace"]), pod_name=quote(handle["pod_name"]))


def aws_links() -> list[BaseOperatorLink]:
    """The ECS task and CloudWatch log links (:mod:`.links_aws`), where the amazon provider is installed."""
    try:
        from airflow_batch_infer.links_aws import EcsTaskLink, TritonCloudWatchLogLink
    except ImportError:  # no amazon extra: no ECS server either
        return []
    return [EcsTaskLink(), TritonCloudWatchLogLink()]


class OutputTableLink(BaseOperatorLink):
    """The output table: its S3 prefix in the console, its folder, or its Asset URI (a database table)."""

    name = "Output table"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        uri = str(return_value(ti_key).get("output_uri") or "")
        if uri.startswith("file://"):
            return uri
        return _file_or_console_url(uri) if uri else ""


class RunReportLink(BaseOperatorLink):
    """The run's report, ``<run folder>/report.html``, next to its manifest and summary."""

    name = "Run report"

    def get_link(self, operator: Any, *, ti_key: TaskInstanceKey) -> str:
        run_dir = str(return_value(ti_key).get("run_dir") or "")
        if not run_dir:
            return ""
        report = run_dir.rstrip("/") + "/" + REPORT_FILE
        if report.startswith(("s3://", "s3a://")):
            parts = urlsplit(report)
            bucket = parts.netloc.rpartition("@")[2]
            return (
                f"https://s3.console.aws.amazon.com/s3/object/{bucket}?prefix={quote(parts.path.lstrip('/'))}"
            )
        return _file_or_console_url(report)
