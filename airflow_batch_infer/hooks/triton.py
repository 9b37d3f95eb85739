"""TritonHook: a gRPC connection to a Triton Inference Server."""

from __future__ import annotations

import json
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

if TYPE_CHECKING:
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient

DEFAULT_GRPC_PORT = 8001
DEFAULT_MAX_MESSAGE_MB = 1024


class TritonHook(BaseHook):
    """Talks to a Triton Inference Server over gRPC.

    The endpoint comes from the ``triton`` connection (host, gRPC port, TLS files and headers in its
    extra), or from ``url`` when a setup task started the server and returned its address; TLS and
    headers still come from the connection when it exists.

    :param triton_conn_id: the Airflow connection of type ``triton``.
    :param url: ``host:port`` that overrides the connection's host and port.
    """

    conn_name_attr = "triton_conn_id"
    default_conn_name = "triton_default"
    conn_type = "triton"
    hook_name = "Triton Inference Server"

    def __init__(self, triton_conn_id: str = default_conn_name, url: str | None = None) -> None:
        super().__init__()
        self.triton_conn_id = triton_conn_id
        self._url = url

    @cached_property
    def _extra(self) -> dict[str, Any]:
        if self._url and not self._connection_exists():
            return {}
        return self.get_connection(self.triton_conn_id).extra_dejson

    def _connection_exists(self) -> bool:
        try:
            self.get_connection(self.triton_conn_id)
        except Exception:  # AirflowNotFoundException, or no metadata DB in a plain script
            return False
        return True

    @cached_property
    def url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        if self._url:
            return self._url
        conn = self.get_connection(self.triton_conn_id)
        if not conn.host:
            raise ValueError(
                f"Connection {self.triton_conn_id!r} has no host: set the Triton server's address in it, "
                "or pass the endpoint returned by StartTritonServerOperator."
            )
        return f"{conn.host}:{conn.port or DEFAULT_GRPC_PORT}"

    @property
    def headers(self) -> dict[str, str] | None:
        """Headers sent with every request (for example an auth token), from the connection extra."""
        headers = self._extra.get("headers")
        if isinstance(headers, str):
            headers = json.loads(headers)
        return headers or None

    def channel_args(self) -> list[tuple[str, int]]:
        """gRPC channel options: large message limits (big batches) and keepalive for long jobs."""
        max_bytes = int(self._extra.get("max_message_mb") or DEFAULT_MAX_MESSAGE_MB) * 1024 * 1024
        max_bytes = min(max_bytes, 2**31 - 1)
        return [
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ]

    def _tls_kwargs(self) -> dict[str, Any]:
        """TLS options: the client reads the PEM files named in the connection extra."""
        extra = self._extra
        if not extra.get("ssl"):
            return {}
        return {
            "ssl": True,
            "root_certificates": extra.get("root_certificates"),
            "private_key": extra.get("private_key"),
            "certificate_chain": extra.get("certificate_chain"),
        }

    def get_conn(self) -> grpcclient.InferenceServerClient:
        """The synchronous gRPC client (one per hook, reused)."""
        return self._sync_client

    @cached_property
    def _sync_client(self) -> grpcclient.InferenceServerClient:
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(
            self.url, channel_args=self.channel_args(), **self._tls_kwargs()
        )

    def get_async_client(self) -> aioclient.InferenceServerClient:
        """A new asyncio gRPC client; create it inside the event loop that uses it, and close it there."""
        import tritonclient.grpc.aio as aioclient

        return aioclient.InferenceServerClient(
            self.url, channel_args=self.channel_args(), **self._tls_kwargs()
        )

    def is_server_ready(self) -> bool:
        """Whether the server answers and reports itself ready."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self.get_conn().is_server_ready(headers=self.headers, client_timeout=10))
        except InferenceServerException:
            return False

    def get_model_metadata(self, model_name: str, model_version: str = "") -> dict[str, Any]:
        """Inputs and outputs (name, datatype, shape) the server declares for the model."""
        return self.get_conn().get_model_metadata(
            model_name, model_version, headers=self.headers, as_json=True, client_timeout=30
        )

    def get_model_config(self, model_name: str, model_version: str = "") -> dict[str, Any]:
        """The model's configuration as loaded by the server (``max_batch_size``, batching, instances)."""
        response = self.get_conn().get_model_config(
            model_name, model_version, headers=self.headers, as_json=True, client_timeout=30
        )
        return response.get("config", response)

    def get_inference_statistics(self, model_name: str = "", model_version: str = "") -> dict[str, Any]:
        """Per-model counters: requests, rows (``inference_count``) and executions (``execution_count``)."""
        return self.get_conn().get_inference_statistics(
            model_name, model_version, headers=self.headers, as_json=True, client_timeout=30
        )

    def test_connection(self) -> tuple[bool, str]:
        """Used by the connection form's Test button."""
        if self.is_server_ready():
            return True, f"Triton server at {self.url} is ready."
        return False, f"Triton server at {self.url} is not reachable or not ready."

    def close(self) -> None:
        """Close the synchronous client's channel, if one was opened."""
        if "_sync_client" in self.__dict__:
            self._sync_client.close()
            del self.__dict__["_sync_client"]
