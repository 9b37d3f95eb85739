"""StartTritonServerOperator (a setup task) and StopTritonServerOperator (its teardown)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_batch_infer.runtimes import ServerInfo, get_runtime


class StartTritonServerOperator(BaseOperator):
    """Start a Triton Inference Server for the job, wait until its models are ready, return its endpoint.

    Use it as a setup task; the returned dict (endpoint and a handle: pid, container id, ...) is what
    :class:`StopTritonServerOperator` and the infer tasks take.

    :param model_repository: the model repository (``<model>/config.pbtxt``).
    :param models: models to load (all in the repository when ``None``).
    :param runtime: where the server runs: ``local`` (a process on this machine).
    :param runtime_options: keyword options of the runtime (see ``airflow_batch_infer.runtimes``).
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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_repository = model_repository
        self.models = models
        self.runtime = runtime
        self.runtime_options = runtime_options or {}

    def execute(self, context: Any) -> dict[str, Any]:
        runtime = get_runtime(self.runtime, **self.runtime_options)
        info = runtime.start(str(self.model_repository), list(self.models) if self.models else None)
        self.log.info(
            "Triton server ready (%s runtime): gRPC %s, metrics %s",
            info.runtime,
            info.grpc_url,
            info.metrics_url,
        )
        return info.to_dict()


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
