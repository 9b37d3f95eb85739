"""Where the embedded defaults keep their files: staging, outputs, server environments, the DuckDB file.

Both folders are ``[batch_infer]`` settings (:mod:`airflow_batch_infer.config`): ``home`` and
``triton_server_env``, also set by ``$BATCH_INFER_HOME`` and ``$BATCH_INFER_TRITON_ENV``.
"""

from __future__ import annotations

from pathlib import Path

from airflow_batch_infer.config import get_setting

HOME_ENV = "BATCH_INFER_HOME"
TRITON_ENV_ENV = "BATCH_INFER_TRITON_ENV"


def batch_infer_home() -> Path:
    """Return the root folder of the embedded defaults (``[batch_infer] home``, else a per-user folder)."""
    configured = get_setting("home")
    if configured:
        return Path(configured).expanduser().resolve()
    return Path.home() / ".local" / "share" / "airflow-batch-infer"


def triton_server_env() -> Path:
    """The local runtime's server environment (``[batch_infer] triton_server_env``, else under home).

    It is shared by every run on the machine, so that it is built once.
    """
    configured = get_setting("triton_server_env")
    if configured:
        return Path(configured).expanduser().resolve()
    return batch_infer_home() / "triton-server-env"
