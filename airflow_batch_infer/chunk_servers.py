"""Which of the run's Triton servers a chunk streams to: its own, by round robin over the chunks, then each
of the others in turn when it is not ready or goes away."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from airflow_batch_infer.hooks.triton import TritonHook
from airflow_batch_infer.runtimes.base import ServerInfo
from airflow_batch_infer.runtimes.fleet import fleet_servers


class ChunkServers:
    """The servers one chunk may use, in the order to try them.

    :param server: the start task's return value (one server or a fleet), a ``host:port``, or ``None`` for
        the connection's endpoint.
    :param conn_id: the ``triton`` connection (TLS, headers; the endpoint when ``server`` gives none).
    :param chunk_index: the chunk's index, which picks its own server.
    :param logger: where passing over a server is logged.
    """

    def __init__(self, server: Any, conn_id: str, chunk_index: int, logger: logging.Logger) -> None:
        self.server = server
        self.conn_id = conn_id
        self.chunk_index = chunk_index
        self.log = logger
        servers: list[ServerInfo | None] = [*fleet_servers(server)] or [None]
        first = chunk_index % len(servers)
        #: the chunk's own server, then the run's others; ``[None]`` for an endpoint given otherwise.
        self.candidates = servers[first:] + servers[:first]

    def endpoint(self, server: ServerInfo | None) -> str | None:
        """The gRPC endpoint of ``server``, or the one given as ``host:port`` (``None``: the connection's)."""
        given = None if isinstance(self.server, Mapping) else (self.server or None)
        return server.grpc_url if server is not None else given

    def ready_hook(self, start: int = 0) -> tuple[TritonHook, int]:
        """A hook on the first ready candidate from position ``start`` on, and that position (a server
        still loading or gone is passed over)."""
        rest = self.candidates[start:]
        for position, server in enumerate(rest, start):
            hook = TritonHook(self.conn_id, url=self.endpoint(server))
            if len(rest) == 1 or hook.is_server_ready():
                return hook, position
            self.log.warning(
                "Chunk %d: Triton server %s at %s is not ready; trying the run's next server.",
                self.chunk_index,
                server.handle.get("server_id") if server else "-",
                hook.url,
            )
            hook.close()
        raise RuntimeError(
            f"Chunk {self.chunk_index}: none of the run's {len(rest)} Triton servers is ready "
            f"({', '.join(s.grpc_url for s in rest if s)}). Check the start task's log."
        )

    def serving(self, hook: TritonHook) -> ServerInfo | None:
        """The run's server that ``hook`` talks to (``None`` for an endpoint given otherwise)."""
        return next((s for s in fleet_servers(self.server) if s.grpc_url == hook.url), None)
