"""The provider's ``[batch_infer]`` configuration section, read with Airflow's configuration API.

Each setting is looked up, first found wins, in:

1. its historical environment variable, where it has one (``BATCH_INFER_HOME``, ``BATCH_INFER_TRITON_ENV``,
   ``BATCH_INFER_STAGING_RETENTION_DAYS``), so that existing deployments keep working;
2. Airflow's configuration: ``airflow.cfg``'s ``[batch_infer]`` section or ``AIRFLOW__BATCH_INFER__<KEY>``
   (and ``_CMD`` / ``_SECRET`` as Airflow allows);
3. the default declared here, which ``get_provider_info`` also publishes (``airflow config list``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from airflow_batch_infer import __version__

SECTION = "batch_infer"


@dataclass(frozen=True)
class Setting:
    """One option of the ``[batch_infer]`` section.

    :param key: the option's name.
    :param type: ``string``, ``integer``, ``float`` or ``boolean``, as Airflow's provider schema names them.
    :param default: the value when nothing sets it (``None``: computed, as the description says).
    :param description: what it is, shown by ``airflow config list``.
    :param example: an example value.
    :param legacy_env: the environment variable that set it before the section existed (still read first).
    """

    key: str
    type: str
    default: str | None
    description: str
    example: str | None = None
    legacy_env: str | None = None


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting(
            "home",
            "string",
            None,
            "Root folder of the embedded defaults: staging, server folders, the DuckDB warehouse, the "
            "iceberg catalog. Default: ~/.local/share/airflow-batch-infer. Also $BATCH_INFER_HOME.",
            "/srv/batch-infer",
            "BATCH_INFER_HOME",
        ),
        Setting(
            "triton_server_env",
            "string",
            None,
            "The local runtime's prebuilt server environment (nvidia-pytriton, numpy<2, onnxruntime), "
            "made once by `python -m airflow_batch_infer.runtimes.local prepare`; a task never builds it. "
            "Default: <home>/triton-server-env. Also $BATCH_INFER_TRITON_ENV.",
            "/opt/triton-server-env",
            "BATCH_INFER_TRITON_ENV",
        ),
        Setting(
            "lease_timeout",
            "float",
            "1800",
            "Seconds a server may go without a lease renewal by its run before its keeper or the reaper "
            "stops it, where a DAG does not say (lease_timeout=); 0 for no lease.",
            "3600",
        ),
        Setting(
            "staging_retention_days",
            "float",
            "7",
            "Days a run's staging folder is kept once its run is over (the triton_reaper DAG and "
            "StagingRetentionOperator). Also $BATCH_INFER_STAGING_RETENTION_DAYS.",
            "14",
            "BATCH_INFER_STAGING_RETENTION_DAYS",
        ),
        Setting(
            "default_runtime",
            "string",
            "local",
            "Where a run's Triton server runs when the DAG does not say: local, docker, kubernetes, ecs, "
            "an entry point of the airflow_batch_infer.runtimes group or a 'module:Class' path.",
            "kubernetes",
        ),
    )
}


def _airflow_conf() -> Any:
    """Airflow's configuration: the task SDK's parser where it exists, else the core one."""
    try:
        from airflow.sdk.configuration import conf
    except ImportError:  # pragma: no cover - Airflow without the task SDK's parser
        from airflow.configuration import conf
    return conf


def get_setting(key: str) -> str | None:
    """The value of ``[batch_infer] key``: its historical variable, Airflow's configuration, its default.

    :param key: an option of :data:`SETTINGS`.
    """
    setting = SETTINGS[key]
    if setting.legacy_env and os.environ.get(setting.legacy_env):
        return os.environ[setting.legacy_env]
    value = _airflow_conf().get(SECTION, key, fallback=None)
    if value is not None and str(value).strip() != "":
        return str(value)
    return setting.default


def get_float(key: str) -> float:
    """``[batch_infer] key`` as a number; a value that is not one fails naming the option.

    :param key: an option of :data:`SETTINGS` of type ``float``.
    """
    value = get_setting(key)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        where = SETTINGS[key].legacy_env or f"AIRFLOW__{SECTION.upper()}__{key.upper()}"
        raise ValueError(
            f"[{SECTION}] {key} must be a number, got {value!r}: fix it in airflow.cfg or ${where}."
        ) from None


def provider_config() -> dict[str, Any]:
    """The ``config`` entry of the provider info: the section as ``airflow config list`` shows it."""
    return {
        SECTION: {
            "description": "Offline batch inference on Triton: where files live, the local server "
            "environment, server leases, staging retention and the default runtime.",
            "options": {
                s.key: {
                    "description": s.description,
                    "version_added": __version__,
                    "type": s.type,
                    "example": s.example,
                    "default": s.default,
                }
                for s in SETTINGS.values()
            },
        }
    }
