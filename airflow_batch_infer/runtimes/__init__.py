"""Where a Triton server runs. ``local`` (a process on this machine) is the embedded default.

``docker``, ``kubernetes`` and ``ecs`` run NVIDIA's ``tritonserver`` image on GPU nodes. A DAG switches by
name; the options are each runtime's constructor keywords, JSON-serialisable (they travel in the DAG and
through the triggerer):

- ``local``: :class:`~airflow_batch_infer.runtimes.local.LocalTritonRuntime`
- ``docker``: :class:`~airflow_batch_infer.runtimes.docker.DockerTritonRuntime` (extra ``docker``)
- ``kubernetes``: :class:`~airflow_batch_infer.runtimes.kubernetes.KubernetesTritonRuntime`
  (extra ``kubernetes``)
- ``ecs``: :class:`~airflow_batch_infer.runtimes.ecs.EcsTritonRuntime` (extra ``amazon``)

A site's own :class:`TritonRuntime` subclass is used by its class path (``"my_pkg.runtimes:SlurmRuntime"``)
or by the name of an entry point in the ``airflow_batch_infer.runtimes`` group
(:mod:`airflow_batch_infer.plugins`). Its :class:`ServerInfo` must carry that same name in ``runtime``: the
stop task and the reaper find the runtime again by it.
"""

from __future__ import annotations

import importlib
from typing import Any

from airflow_batch_infer.plugins import RUNTIME_GROUP, resolve_plugin
from airflow_batch_infer.runtimes.base import ServerInfo, ServerStartError, TritonRuntime
from airflow_batch_infer.runtimes.labels import ServerOwner

__all__ = [
    "RUNTIMES",
    "ServerInfo",
    "ServerOwner",
    "ServerStartError",
    "TritonRuntime",
    "get_runtime",
]

#: Runtime name → (module, class, pip extra that brings its provider, or ``None``).
RUNTIMES: dict[str, tuple[str, str, str | None]] = {
    "local": ("airflow_batch_infer.runtimes.local", "LocalTritonRuntime", None),
    "docker": ("airflow_batch_infer.runtimes.docker", "DockerTritonRuntime", "docker"),
    "kubernetes": ("airflow_batch_infer.runtimes.kubernetes", "KubernetesTritonRuntime", "kubernetes"),
    "ecs": ("airflow_batch_infer.runtimes.ecs", "EcsTritonRuntime", "amazon"),
}


def get_runtime(name: str, **options: Any) -> TritonRuntime:
    """Return the runtime called ``name`` configured with ``options``.

    :param name: ``local``, ``docker``, ``kubernetes``, ``ecs``, an entry point of the
        ``airflow_batch_infer.runtimes`` group, or a class path ``"my_pkg.module:MyRuntime"``.
    :param options: keyword arguments of that runtime's constructor.
    """
    if name in RUNTIMES:
        module_name, class_name, extra = RUNTIMES[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if extra is None:
                raise
            raise ImportError(
                f"The {name!r} Triton runtime needs `pip install 'airflow-provider-batch-infer[{extra}]'`: "
                f"{exc}"
            ) from exc
        runtime_class = getattr(module, class_name)
    else:
        runtime_class = resolve_plugin(
            name,
            {n: f"{m}:{c}" for n, (m, c, _) in RUNTIMES.items()},
            RUNTIME_GROUP,
            "Triton runtime",
            TritonRuntime,
        )
    try:
        return runtime_class(**options)
    except TypeError as exc:
        raise TypeError(f"Bad runtime_options for the {name!r} Triton runtime: {exc}") from exc
