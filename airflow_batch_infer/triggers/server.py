"""TritonServerReadyTrigger: wait in the triggerer until a launched Triton server and its models are ready."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_batch_infer.runtimes import ServerInfo, get_runtime
from airflow_batch_infer.runtimes.readiness import wait_until_ready


class TritonServerReadyTrigger(BaseTrigger):
    """Poll a launched server's readiness (``/v2/health/ready``, ``/v2/models/<m>/ready``) until it is ready.

    Between polls it asks the runtime whether the server still runs, so a server that dies (or a model that
    fails to load, or is missing) ends the wait at once. Fires one event: ``{"status": "ready", "server":
    ...}``, or ``{"status": "error", "message": ...}`` with the server's last log lines, also when
    ``deadline`` passes.

    :param server: the launched server (``ServerInfo.to_dict()``).
    :param runtime: the runtime's name (``local``, ``docker``, ``kubernetes``, ``ecs``).
    :param runtime_options: its options, as given to the start task.
    :param models: models that must be ready (the server's own readiness covers all when ``None``).
    :param deadline: epoch seconds after which the wait fails (fixed at deferral, so that a trigger moved to
        another triggerer keeps it).
    :param poll_interval: seconds between polls.
    """

    def __init__(
        self,
        *,
        server: dict[str, Any],
        runtime: str,
        deadline: float,
        runtime_options: dict[str, Any] | None = None,
        models: list[str] | None = None,
        poll_interval: float = 5.0,
    ) -> None:
        super().__init__()
        self.server = server
        self.runtime = runtime
        self.runtime_options = runtime_options or {}
        self.models = list(models) if models else None
        self.deadline = float(deadline)
        self.poll_interval = float(poll_interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "server": self.server,
                "runtime": self.runtime,
                "runtime_options": self.runtime_options,
                "models": self.models,
                "deadline": self.deadline,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        runtime = get_runtime(self.runtime, **self.runtime_options)
        info = ServerInfo.from_dict(self.server)
        self.log.info(
            "Waiting for Triton server %s (%s runtime) and models %s.",
            info.handle.get("server_id"),
            info.runtime,
            self.models or "all",
        )
        event = await wait_until_ready(runtime, info, self.models, self.deadline, self.poll_interval)
        if event["status"] == "ready":
            self.log.info(event["message"])
        else:
            self.log.error(event["message"])
        yield TriggerEvent(event)
