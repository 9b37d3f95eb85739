"""Where the embedded defaults keep their files: staging, outputs, server environments, the DuckDB file."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "BATCH_INFER_HOME"
TRITON_ENV_ENV = "BATCH_INFER_TRITON_ENV"


def batch_infer_home() -> Path:
    """Return the root folder of the embedded defaults (``$BATCH_INFER_HOME``, else a per-user folder)."""
    configured = os.environ.get(HOME_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return Path.home() / ".local" / "share" / "airflow-batch-infer"


def triton_server_env() -> Path:
    """The local runtime's server environment (``$BATCH_INFER_TRITON_ENV``, else under the home folder).

    It is shared by every run on the machine, so that it is built once.
    """
    configured = os.environ.get(TRITON_ENV_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return batch_infer_home() / "triton-server-env"
