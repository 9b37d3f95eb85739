"""StartTritonServerOperator (a setup task) and StopTritonServerOperator (its teardown)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator, conf

from airflow_batch_infer.runtimes import ServerInfo, ServerOwner, ServerStartError, get_runtime
from airflow_batch_infer.triggers.server import TritonServerReadyTrigger

#: Extra time Airflow gives a deferred start beyond the trigger's own deadline, so that the trigger (which
#: reports the server's log lines) fails first.
_DEFER_MARGIN = timedelta(minutes=5)


class StartTritonServerOperator(BaseOperator):
    """Start a Triton Inference Server for the job, wait until its models are ready, return its endpoint.

    Use it as a setup task; the returned dict (endpoint and a handle: pid, container id, Pod, ECS task) is
    what :class:`StopTritonServerOperator` and the infer tasks take. The server is labelled with this task's
    DAG run, so that ``TritonServerReaperOperator`` can stop it if the run ends without its teardown.

    :param model_repository: the model repository (``<model>/config.pbtxt``); the runtimes' own
        ``model_repository`` option overrides where a remote server reads it (``s3://...``).
    :param models: models to load (all in the repository when ``None``).
    :param runtime: where the server runs: ``local`` (a process on this machine), ``docker``,
        ``kubernetes`` or ``ecs``.
    :param runtime_options: keyword options of the runtime (see ``airflow_batch_infer.runtimes``).
    :param deferrable: launch, then wait in the triggerer (``TritonServerReadyTrigger``) while the models
        load, holding no worker slot.
    :param poll_interval: seconds between readiness polls when deferred.
    :param lease_timeout: seconds the server may go without a lease renewal before its keeper (or the
        reaper) stops it; the start task renews it while it waits, the infer and persist tasks while they
        work (``airflow_batch_infer.runtimes.lease.renew``). Default: the runtime's (30 minutes).
    :param reattach: a retry of this task first looks for a running server that an earlier try started
        (same DAG run, task and map index, same models) and returns it, waiting for it if it is still
        loading, instead of starting a second one.
    """

    template_fields: Sequence[str] = ("model_repository", "models", "runtime", "runtime_options")
    ui_color = "#76b900"

    def __init__(
        self,
        *,
        model_repository: str,
        models: list[str] | None = None,
        runtime: str = "local",
        runtime_options: dict[str, Any] | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 5.0,
        lease_timeout: float | None = None,
        reattach: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_repository = model_repository
        self.models = models
        self.runtime = runtime
        self.runtime_options = runtime_options or {}
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.lease_timeout = lease_timeout
        self.reattach = reattach

    def _runtime_options(self) -> dict[str, Any]:
        options = dict(self.runtime_options)
        if self.lease_timeout is not None:
            options["lease_timeout"] = float(self.lease_timeout)
        return options

    def execute(self, context: Any) -> dict[str, Any]:
        runtime = get_runtime(self.runtime, **self._runtime_options())
        models = list(self.models) if self.models else None
        owner = ServerOwner.from_context(context)
        earlier = runtime.find_server(owner, models) if (self.reattach and owner) else None
        if earlier is not None:
            self.log.info(
                "Reattaching to Triton server %s, started by an earlier try of this task (%s runtime).",
                earlier.handle.get("server_id"),
                earlier.runtime,
            )
            runtime.renew_lease(earlier)
        if not self.deferrable:
            if earlier is not None:
                info = runtime.wait_ready(earlier, models)
            else:
                info = runtime.start(str(self.model_repository), models, owner=owner)
            self._log_ready(info)
            return info.to_dict()
        info = earlier or runtime.launch(str(self.model_repository), models, owner=owner)
        timeout = runtime.startup_timeout
        self.log.info(
            "Triton server %s %s (%s runtime); deferring until it is ready (at most %.0f s).",
            info.handle.get("server_id"),
            "reattached" if earlier else "launched",
            info.runtime,
            timeout,
        )
        self.defer(
            trigger=TritonServerReadyTrigger(
                server=info.to_dict(),
                runtime=self.runtime,
                runtime_options=self._runtime_options(),
                models=models,
                deadline=time.time() + timeout,
                poll_interval=self.poll_interval,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=timeout) + _DEFER_MARGIN,
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Resume after the trigger: return the ready server, or stop what was launched and fail."""
        info = ServerInfo.from_dict(event["server"])
        if event.get("status") == "ready":
            self._log_ready(info)
            return info.to_dict()
        with contextlib.suppress(Exception):
            get_runtime(self.runtime, **self._runtime_options()).stop(info)
        raise ServerStartError(event.get("message") or "The Triton server did not become ready.")

    def _log_ready(self, info: ServerInfo) -> None:
        self.log.info(
            "Triton server ready (%s runtime): gRPC %s, metrics %s",
            info.runtime,
            info.grpc_url,
            info.metrics_url,
        )


class StopTritonServerOperator(BaseOperator):
    """Stop the server that :class:`StartTritonServerOperator` started. Use it as that task's teardown.

    Stopping a server that is already gone succeeds and says so.

    :param server: the start task's return value (``start.output``).
    :param runtime_options: keyword options of the runtime, as given to the start task.
    """

    template_fields: Sequence[str] = ("server", "runtime_options")
    ui_color = "#76b900"

    def __init__(
        self, *, server: dict[str, Any] | None, runtime_options: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.server = server
        self.runtime_options = runtime_options or {}

    def execute(self, context: Any) -> bool:
        if not self.server:
            self.log.info("No server was started for this run: nothing to stop.")
            return False
        info = ServerInfo.from_dict(self.server)
        stopped = get_runtime(info.runtime, **self.runtime_options).stop(info)
        if stopped:
            self.log.info("Stopped the Triton server at %s.", info.grpc_url)
        else:
            self.log.info("The Triton server at %s was already gone.", info.grpc_url)
        return stopped
