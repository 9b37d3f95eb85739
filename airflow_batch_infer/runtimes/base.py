"""The contract every Triton runtime (local process, docker, kubernetes, ecs) fulfils."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any


class ServerStartError(RuntimeError):
    """The server could not be started or did not become ready; the message carries its own log lines."""


@dataclass
class ServerInfo:
    """Where a started server listens and how to find it again, from any worker.

    :param runtime: name of the runtime that started it (``local``, ``docker``, ...).
    :param grpc_url: ``host:port`` of the gRPC endpoint.
    :param http_url: ``http://host:port`` of the HTTP endpoint.
    :param metrics_url: ``http://host:port/metrics`` of the Prometheus endpoint.
    :param handle: runtime-specific, JSON-serialisable identity of the server (pid, container id, ...).
    """

    runtime: str
    grpc_url: str
    http_url: str
    metrics_url: str
    handle: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServerInfo:
        return cls(**data)


class TritonRuntime(ABC):
    """Starts and stops a Triton Inference Server somewhere."""

    name: str

    @abstractmethod
    def start(self, model_repository: str, models: list[str] | None = None) -> ServerInfo:
        """Start a server for ``models`` (all in the repository when ``None``) and wait until it is ready.

        A start that fails removes what it created and raises :class:`ServerStartError`.
        """

    @abstractmethod
    def stop(self, info: ServerInfo) -> bool:
        """Stop the server. Idempotent: returns ``False`` when it was already gone."""

    @abstractmethod
    def is_running(self, info: ServerInfo) -> bool:
        """Whether the server process (container, pod, task) is still there."""

    @abstractmethod
    def log_tail(self, info: ServerInfo, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's own log, for error messages."""
