"""The contract every Triton runtime (local process, docker, kubernetes, ecs) fulfils."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_batch_infer.runtimes.labels import ServerOwner


#: Default ``lease_timeout`` of a server: stopped after 30 minutes without a renewal by its run.
DEFAULT_LEASE_TIMEOUT = 1800.0


class ServerStartError(RuntimeError):
    """The server could not be started or did not become ready; the message carries its own log lines."""


@dataclass
class ServerInfo:
    """Where a started server listens and how to find it again, from any worker.

    :param runtime: name of the runtime that started it (``local``, ``docker``, ...).
    :param grpc_url: ``host:port`` of the gRPC endpoint (empty until the address is known).
    :param http_url: ``http://host:port`` of the HTTP endpoint.
    :param metrics_url: ``http://host:port/metrics`` of the Prometheus endpoint.
    :param handle: runtime-specific, JSON-serialisable identity of the server (pid, container id, ...).
    """

    runtime: str
    grpc_url: str = ""
    http_url: str = ""
    metrics_url: str = ""
    handle: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def at(
        cls, runtime: str, host: str | None, ports: Mapping[str, int], handle: dict[str, Any]
    ) -> ServerInfo:
        """The server listening on ``host`` at ``ports``; without URLs while the host or a port is unknown.

        :param runtime: the runtime's name.
        :param host: the host name or address the clients use (``None`` or empty: not known yet).
        :param ports: ``http``, ``grpc`` and ``metrics`` ports (0: not known yet).
        :param handle: the server's handle.
        """
        if not host or not all(ports.get(key) for key in ("http", "grpc", "metrics")):
            return cls(runtime, handle=handle)
        return cls(
            runtime,
            grpc_url=f"{host}:{ports['grpc']}",
            http_url=f"http://{host}:{ports['http']}",
            metrics_url=f"http://{host}:{ports['metrics']}/metrics",
            handle=handle,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServerInfo:
        """The server of ``to_dict()``'s output; of a start task's fleet, its first server."""
        return cls(
            **{
                key: data[key]
                for key in ("runtime", "grpc_url", "http_url", "metrics_url", "handle")
                if key in data
            }
        )


class TritonRuntime(ABC):
    """Starts and stops a Triton Inference Server somewhere: a local process, a container, a Pod, a task.

    A start is split in two so that the start operator can defer while the server loads: :meth:`launch`
    creates the server and returns at once; :meth:`wait_ready` (or ``TritonServerReadyTrigger``) waits
    until it is ready. Every server records the DAG run that started it (:class:`ServerOwner`), so that
    the reaper can find and stop the servers whose run has ended (:meth:`list_servers`). Subclasses set
    :attr:`startup_timeout` and implement :meth:`launch`, :meth:`stop`, :meth:`is_running`,
    :meth:`log_tail` and :meth:`list_servers`.
    """

    name: str

    #: Seconds a start may take, from launch until the server and its models are ready.
    startup_timeout: float = 600.0
    #: Seconds a server may go without a lease renewal (``airflow_batch_infer.runtimes.lease.renew``)
    #: before its keeper or the reaper stops it; 0 for no lease.
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT

    @abstractmethod
    def launch(
        self, model_repository: str, models: list[str] | None = None, owner: ServerOwner | None = None
    ) -> ServerInfo:
        """Create the server and return at once, before it is ready.

        A launch that fails removes what it created and raises :class:`ServerStartError`.

        :param model_repository: where the server reads its models.
        :param models: models to load (all in the repository when ``None``).
        :param owner: the task instance that starts it, recorded on the server.
        """

    @abstractmethod
    def list_servers(self) -> list[ServerInfo]:
        """Every server of this runtime's kind started by this package, running or exited.

        Each one's ``handle["owner"]`` is its :class:`ServerOwner` as a dict (``None`` when unknown) and
        ``handle["started_at"]`` its start time (epoch seconds, when known).
        """

    def renew_lease(self, info: ServerInfo) -> bool:
        """Renew the server's lease; ``False`` where this runtime keeps none (the default)."""
        return False

    def find_server(self, owner: ServerOwner, models: list[str] | None = None) -> ServerInfo | None:
        """A running server that ``owner`` (the same task instance) started earlier, ready ones first.

        A retried start task reattaches to it instead of starting a second server (as the Kubernetes pod
        operator's ``reattach_on_restart`` does). Servers that record their models must have the same ones.

        :param owner: the start task instance (DAG, run, task, map index).
        :param models: the models the start task asks for.
        """
        from airflow_batch_infer.runtimes.labels import ServerOwner as Owner
        from airflow_batch_infer.runtimes.probe import is_ready

        candidates = []
        for info in self.list_servers():
            handle = info.handle
            if Owner.from_dict(handle.get("owner")) != owner:
                continue
            if handle.get("state") not in (None, "running", "RUNNING", "Running", "PENDING", "Pending"):
                continue
            recorded = handle.get("models")
            if recorded is not None and sorted(recorded) != sorted(models or []):
                continue
            if handle.get("lease_timeout") and (handle.get("lease_age") or 0) > handle["lease_timeout"]:
                continue
            info = self.refresh(info)
            ready = bool(info.http_url) and is_ready(info, models)
            candidates.append((not ready, -float(handle.get("started_at") or 0), info))
        candidates.sort(key=lambda c: c[:2])
        if not candidates:
            return None
        found = candidates[0][2]
        for key in ("state", "keeper", "pids", "lease_age", "lease_renewed_at"):  # what a listing adds
            found.handle.pop(key, None)
        return found

    def refresh(self, info: ServerInfo) -> ServerInfo:
        """``info`` with what became known since launch (an ECS task's address); the same by default."""
        return info

    def failure_reason(self, info: ServerInfo) -> str | None:
        """Why the server will never become ready (it exited, its image cannot be pulled), else ``None``."""
        return None if self.is_running(info) else "the server is no longer running"

    def start(
        self, model_repository: str, models: list[str] | None = None, owner: ServerOwner | None = None
    ) -> ServerInfo:
        """Launch, then wait until the server and its models are ready; stop it when that fails.

        :param model_repository: where the server reads its models.
        :param models: models to load (all in the repository when ``None``).
        :param owner: the task instance that starts it, recorded on the server.
        """
        info = self.launch(model_repository, models, owner)
        try:
            return self.wait_ready(info, models)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop(info)
            raise

    def wait_ready(self, info: ServerInfo, models: list[str] | None = None) -> ServerInfo:
        """Block until the server launched as ``info`` is ready, within :attr:`startup_timeout`.

        The same code as ``TritonServerReadyTrigger``, run in this thread.

        :raises ServerStartError: with the server's last log lines, when it died or the time ran out.
        """
        from airflow_batch_infer.runtimes.readiness import wait_until_ready

        deadline = time.time() + self.startup_timeout
        event = run_coroutine(wait_until_ready(self, info, models, deadline, poll_interval=1.0))
        if event["status"] != "ready":
            raise ServerStartError(event["message"])
        return ServerInfo.from_dict(event["server"])

    @abstractmethod
    def stop(self, info: ServerInfo) -> bool:
        """Stop the server. Idempotent: returns ``False`` when it was already gone."""

    @abstractmethod
    def is_running(self, info: ServerInfo) -> bool:
        """Whether the server process (container, pod, task) is still there."""

    @abstractmethod
    def log_tail(self, info: ServerInfo, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's own log, for error messages."""


def run_coroutine(coroutine: Any) -> Any:
    """Run ``coroutine`` to completion from synchronous code, also when this thread has a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coroutine)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, name="triton-wait-ready")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
