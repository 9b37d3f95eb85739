"""Where a Triton server runs. ``local`` (a process on this machine) is the embedded default."""

from __future__ import annotations

from typing import Any

from airflow_batch_infer.runtimes.base import ServerInfo, ServerStartError, TritonRuntime

__all__ = ["ServerInfo", "ServerStartError", "TritonRuntime", "get_runtime"]


def get_runtime(name: str, **options: Any) -> TritonRuntime:
    """Return the runtime called ``name`` configured with ``options``.

    :param name: ``local`` (more runtimes register here as they are added).
    :param options: keyword arguments of that runtime's constructor.
    """
    if name == "local":
        from airflow_batch_infer.runtimes.local import LocalTritonRuntime

        return LocalTritonRuntime(**options)
    raise ValueError(f"Unknown Triton runtime {name!r}; available: 'local'.")
