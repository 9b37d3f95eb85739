"""TritonServerReadyTrigger: wait in the triggerer until launched Triton servers and their models are up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_batch_infer.runtimes import ServerInfo, get_runtime
from airflow_batch_infer.runtimes.fleet import wait_fleet_ready


class TritonServerReadyTrigger(BaseTrigger):
    """Poll launched servers (``/v2/health/ready``, ``/v2/models/<m>/ready``) until enough are ready.

    Between polls it asks the runtime whether each server still runs, so a server that dies (or a model
    that fails to load, or is missing) ends its wait at once. Fires one event (``fleet.wait_fleet_ready``):
    ``{"status": "ready", "ready": [...], "loading": [...], "failed": [...]}`` once ``min_ready`` servers
    are ready, or ``{"status": "error", "message": ...}`` with the servers' last log lines, also when
    ``deadline`` passes.

    :param servers: the launched servers (``ServerInfo.to_dict()`` each).
    :param runtime: the runtime's name (``local``, ``docker``, ``kubernetes``, ``ecs``).
    :param runtime_options: its options, as given to the start task.
    :param models: models that must be ready (the server's own readiness covers all when ``None``).
    :param deadline: epoch seconds after which the wait fails (fixed at deferral, so that a trigger moved to
        another triggerer keeps it).
    :param poll_interval: seconds between polls.
    :param min_ready: how many servers must be ready (default: all).
    :param server: one launched server (a trigger serialised before ``servers``).
    """

    def __init__(
        self,
        *,
        runtime: str,
        deadline: float,
        servers: list[dict[str, Any]] | None = None,
        runtime_options: dict[str, Any] | None = None,
        models: list[str] | None = None,
        poll_interval: float = 5.0,
        min_ready: int | None = None,
        server: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.servers = list(servers or ([server] if server else []))
        self.runtime = runtime
        self.runtime_options = runtime_options or {}
        self.models = list(models) if models else None
        self.deadline = float(deadline)
        self.poll_interval = float(poll_interval)
        self.min_ready = int(min_ready) if min_ready else len(self.servers)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "servers": self.servers,
                "runtime": self.runtime,
                "runtime_options": self.runtime_options,
                "models": self.models,
                "deadline": self.deadline,
                "poll_interval": self.poll_interval,
                "min_ready": self.min_ready,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        runtime = get_runtime(self.runtime, **self.runtime_options)
        infos = [ServerInfo.from_dict(s) for s in self.servers]
        self.log.info(
            "Waiting for %d of Triton server(s) %s (%s runtime) and models %s.",
            self.min_ready,
            ", ".join(str(i.handle.get("server_id")) for i in infos),
            self.runtime,
            self.models or "all",
        )

        def report(event: dict[str, Any]) -> None:
            (self.log.info if event["status"] == "ready" else self.log.error)(event["message"])

        event = await wait_fleet_ready(
            runtime, infos, self.models, self.deadline, self.poll_interval, self.min_ready, on_event=report
        )
        (self.log.info if event["status"] == "ready" else self.log.error)(event["message"])
        yield TriggerEvent(event)
