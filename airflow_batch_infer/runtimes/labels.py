"""Who owns a server (the DAG run that started it), and the labels (docker labels, Kubernetes labels,
ECS tags) that record it on the server."""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any

#: Every server started by this package carries these.
MANAGED_BY_KEY = "app.kubernetes.io/managed-by"
MANAGED_BY = "airflow-batch-infer"
NAME_KEY = "app.kubernetes.io/name"
NAME = "triton-inference-server"
SERVER_ID_KEY = "app.kubernetes.io/instance"
DAG_ID_KEY = "airflow-batch-infer/dag-id"
RUN_ID_KEY = "airflow-batch-infer/run-id"
TASK_ID_KEY = "airflow-batch-infer/task-id"
MAP_INDEX_KEY = "airflow-batch-infer/map-index"
#: Which of the start task's servers (``servers=N``) this is, from 0.
REPLICA_KEY = "airflow-batch-infer/replica"
#: Seconds the server may go without a lease renewal (a label, tag or annotation the reaper reads).
LEASE_TIMEOUT_KEY = "airflow-batch-infer/lease-timeout"
#: Epoch seconds of the last renewal: a Pod annotation or an ECS tag, updated by ``lease.renew``.
LEASE_RENEWED_KEY = "airflow-batch-infer/lease-renewed-at"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def new_server_id() -> str:
    """A unique server id, ``abi-`` and 12 hex digits: a valid container, Pod and Service name."""
    return f"abi-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class ServerOwner:
    """The task instance that started a server, recorded on the server so that a reaper can judge it.

    :param dag_id: the DAG.
    :param run_id: the DAG run.
    :param task_id: the start task.
    :param map_index: the start task's map index (``-1`` when not mapped).
    :param replica: which of the start task's servers, from 0 (``servers=N``).
    """

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    replica: int = 0

    @classmethod
    def from_context(cls, context: Any) -> ServerOwner | None:
        """The owner from an Airflow task context (``None`` outside a task)."""
        ti = context.get("ti") if hasattr(context, "get") else None
        if ti is None:
            return None
        map_index = getattr(ti, "map_index", -1)
        return cls(ti.dag_id, ti.run_id, ti.task_id, -1 if map_index is None else int(map_index))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ServerOwner | None:
        if not data or not data.get("dag_id") or not data.get("run_id"):
            return None
        return cls(
            data["dag_id"],
            data["run_id"],
            data.get("task_id", ""),
            int(data.get("map_index", -1)),
            int(data.get("replica", 0)),
        )

    def labels(self) -> dict[str, str]:
        """Exact values, for docker labels, Kubernetes annotations and ECS tags."""
        return {
            DAG_ID_KEY: self.dag_id,
            RUN_ID_KEY: self.run_id,
            TASK_ID_KEY: self.task_id,
            MAP_INDEX_KEY: str(self.map_index),
            REPLICA_KEY: str(self.replica),
        }

    @classmethod
    def from_labels(cls, labels: dict[str, str] | None) -> ServerOwner | None:
        """Read an owner back from :meth:`labels` (``None`` when the server has no owner)."""
        labels = labels or {}
        if not labels.get(DAG_ID_KEY) or not labels.get(RUN_ID_KEY):
            return None
        try:
            map_index = int(labels.get(MAP_INDEX_KEY, "-1"))
            replica = int(labels.get(REPLICA_KEY, "0"))
        except ValueError:
            map_index, replica = -1, 0
        return cls(labels[DAG_ID_KEY], labels[RUN_ID_KEY], labels.get(TASK_ID_KEY, ""), map_index, replica)


def server_labels(server_id: str, owner: ServerOwner | None, lease_timeout: float = 0) -> dict[str, str]:
    """Every label of a server, with exact values (docker labels, ECS tags).

    :param server_id: the server's id.
    :param owner: the task instance that starts it.
    :param lease_timeout: seconds without a renewal before the reaper stops it (no label when 0).
    """
    labels = {MANAGED_BY_KEY: MANAGED_BY, NAME_KEY: NAME, SERVER_ID_KEY: server_id}
    if owner is not None:
        labels.update(owner.labels())
    if lease_timeout and lease_timeout > 0:
        labels[LEASE_TIMEOUT_KEY] = f"{float(lease_timeout):g}"
    return labels


def lease_from_labels(labels: dict[str, str] | None) -> dict[str, float]:
    """``lease_timeout`` and ``lease_renewed_at`` from a server's labels, tags or annotations."""
    labels = labels or {}
    found = {}
    for key, name in ((LEASE_TIMEOUT_KEY, "lease_timeout"), (LEASE_RENEWED_KEY, "lease_renewed_at")):
        try:
            found[name] = float(labels[key])
        except (KeyError, TypeError, ValueError):
            continue
    return found


def k8s_label_value(value: str) -> str:
    """``value`` as a valid Kubernetes label value (63 characters of ``[A-Za-z0-9_.-]``, alphanumeric ends).

    A value that had to change gets a short hash of the original, so that two runs never share a label:
    ``manual__2026-11-21T00:00:00+00:00`` becomes ``manual__2026-11-21T00_00_00_00_00-<hash>``.
    The exact value is kept in an annotation.
    """
    if len(value) <= 63 and _LABEL_VALUE.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", value)[:52]
    cleaned = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)
    return f"{cleaned}-{digest}" if cleaned else digest


def k8s_labels(server_id: str, owner: ServerOwner | None) -> dict[str, str]:
    """Every label of a server, as valid Kubernetes label values (selectable with ``kubectl -l``)."""
    return {key: k8s_label_value(value) for key, value in server_labels(server_id, owner).items()}
