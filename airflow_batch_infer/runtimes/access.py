"""Who may call a server's model-control and shared-memory APIs: the holders of its restricted-API key.

With ``restricted_api=True`` the local runtime gives each server a random key and starts it with
``--http-restricted-api`` and ``--grpc-restricted-protocol`` for ``model-repository`` and ``shared-memory``
(Triton 2.51 accepts both flags): a client must send the key to load or unload a model, or to register a
shared-memory region, in the ``batch-infer-key`` header over HTTP and ``triton-grpc-protocol-batch-infer-key``
over gRPC (Triton prefixes the gRPC one). Without it HTTP answers 403, gRPC ``UNAVAILABLE`` (sic: a client
that retries ``UNAVAILABLE`` retries a missing key too). Health, metadata and inference stay open. The key is
kept in ``<server folder>/api-key`` (mode 0600), never in XCom: the handle names only the file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from airflow_batch_infer.runtimes.base import ServerInfo

#: The HTTP request header that carries the key.
KEY_HEADER = "batch-infer-key"
#: The same over gRPC: Triton 2.51 expects its ``triton-grpc-protocol-`` prefix (metadata is lower case).
GRPC_KEY_HEADER = f"triton-grpc-protocol-{KEY_HEADER}"
KEY_FILE = "api-key"
#: The APIs that need the key: model control (code execution) and shared memory (other jobs' data).
RESTRICTED = "model-repository,shared-memory"


def new_key(workdir: Path) -> Path:
    """Create ``<workdir>/api-key`` with a new random key, readable by this user only; return its path.

    A second call for the same server (another port attempt) keeps the key it has.
    """
    path = workdir / KEY_FILE
    if path.exists():
        return path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    return path


def restricted_flags(key: str) -> list[str]:
    """The tritonserver flags that restrict model control and shared memory to holders of ``key``."""
    return [
        f"--http-restricted-api={RESTRICTED}:{KEY_HEADER}={key}",
        f"--grpc-restricted-protocol={RESTRICTED}:{KEY_HEADER}={key}",
    ]


def server_headers(server: dict[str, Any] | ServerInfo, protocol: str = "grpc") -> dict[str, str]:
    """Headers that a client of ``server`` sends to use its restricted APIs (``{}`` when it has none).

    Merge them into the headers of the calls (shared-memory registration, model control).

    :param server: what the start task returned (``ServerInfo.to_dict()``), or a :class:`ServerInfo`.
    :param protocol: ``grpc`` or ``http``.
    """
    handle = server.handle if isinstance(server, ServerInfo) else (server.get("handle") or {})
    path = handle.get("api_key_file")
    if not path:
        return {}
    return {GRPC_KEY_HEADER if protocol == "grpc" else KEY_HEADER: Path(path).read_text().strip()}
