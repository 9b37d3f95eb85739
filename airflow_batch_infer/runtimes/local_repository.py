"""The local runtime's copy of a model repository: the requested models, with ``onnxruntime`` models served
by a generic Python-backend model that runs the same ``model.onnx`` with onnxruntime (the ``nvidia-pytriton``
build of ``tritonserver`` has only the Python backend). Model files are hard-linked, configs copied.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from airflow_batch_infer.runtimes.base import ServerStartError

log = logging.getLogger(__name__)

ONNX_MODEL_PY = Path(__file__).resolve().parent / "python_models" / "onnx_model.py"

_ONNX_BACKENDS = {"onnxruntime"}
_ONNX_PLATFORMS = {"onnxruntime_onnx"}


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a model file (models can be large), copying when the link is not possible.

    Configs and Python files are always copied: the copy may be rewritten, the source must never be.
    """
    if Path(src).name == "config.pbtxt" or src.endswith(".py"):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_new_file(path: Path, text: str) -> None:
    """Write ``text`` to a new inode at ``path`` (never through a hard link to a source file)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def materialize_repository(
    model_repository: str | os.PathLike[str],
    models: list[str] | None,
    target: Path,
    onnx_intra_op_threads: int = 1,
) -> list[str]:
    """Copy the requested models into ``target``; ``onnxruntime`` models become Python-backend models.

    :param model_repository: the source repository (``<model>/config.pbtxt``, ``<model>/<version>/``).
    :param models: model names to copy; all models in the repository when ``None``.
    :param target: the new repository folder (created).
    :param onnx_intra_op_threads: onnxruntime intra-op threads per instance of a converted ONNX model.
    :returns: the names of the models copied.
    """
    from google.protobuf import text_format

    from airflow_batch_infer.model_config import parse_model_config

    source = Path(model_repository)
    if not source.is_dir():
        raise ServerStartError(f"Model repository {source} does not exist.")
    available = sorted(p.name for p in source.iterdir() if (p / "config.pbtxt").is_file())
    names = list(available) if models is None else list(dict.fromkeys(models))
    missing = [m for m in names if m not in available]
    if missing:
        raise ServerStartError(f"Models {missing} are not in {source} (it has {available}).")
    if not names:
        raise ServerStartError(f"No models (folders with a config.pbtxt) in {source}.")

    plans: list[tuple[str, Any, bool]] = []
    for name in names:
        config_path = source / name / "config.pbtxt"
        try:
            config = parse_model_config(config_path.read_text())
        except text_format.ParseError as exc:
            raise ServerStartError(f"Cannot parse {config_path}: {exc}") from exc
        if not config.name:
            config.name = name
        plans.append((name, config, _needs_onnx_conversion(source / name, config)))

    target.mkdir(parents=True)
    for name, config, convert in plans:
        src, dst = source / name, target / name
        shutil.copytree(src, dst, copy_function=_link_or_copy)
        if convert:
            _convert_onnx_model(dst, config, onnx_intra_op_threads)
            log.info(
                "Model %r (backend onnxruntime) is served by the Python backend through onnxruntime: "
                "this tritonserver build (nvidia-pytriton) has no native onnxruntime backend.",
                name,
            )
    return names


def _needs_onnx_conversion(model_dir: Path, config: Any) -> bool:
    backend, platform = config.backend, config.platform
    if backend in _ONNX_BACKENDS or platform in _ONNX_PLATFORMS:
        return True
    if backend == "python" or platform == "ensemble":
        return False
    if not backend and not platform and any(model_dir.glob("[0-9]*/model.onnx")):
        return True
    raise ServerStartError(
        f"The local runtime cannot serve model {config.name!r} (backend {backend!r}, platform "
        f"{platform!r}): its tritonserver build has only the Python backend, so it serves 'python' "
        "and 'onnxruntime' models. Use a GPU runtime (docker, kubernetes, ecs) with NVIDIA's Triton "
        "image for this model."
    )


def _convert_onnx_model(model_dir: Path, config: Any, onnx_intra_op_threads: int) -> None:
    from google.protobuf import text_format

    from airflow_batch_infer.model_config import model_config_pb2

    onnx_name = config.default_model_filename or "model.onnx"
    if not config.input or not config.output:
        raise ServerStartError(
            f"Model {config.name!r}: the local runtime serves ONNX models through the Python backend, "
            "which cannot complete a config from the model file; declare every input and output in "
            f"{model_dir.name}/config.pbtxt."
        )
    config.backend = "python"
    config.platform = ""
    config.default_model_filename = ""
    config.ClearField("optimization")
    for group in config.instance_group:
        group.kind = model_config_pb2().ModelInstanceGroup.KIND_CPU
        group.ClearField("gpus")
    config.parameters["onnx_model_filename"].string_value = onnx_name
    config.parameters["onnx_intra_op_threads"].string_value = str(onnx_intra_op_threads)

    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise ServerStartError(f"Model {config.name!r} has no version folder (e.g. 1/{onnx_name}).")
    for version in versions:
        if not (version / onnx_name).is_file():
            raise ServerStartError(
                f"Model {config.name!r}: {model_dir.name}/{version.name}/{onnx_name} is missing from the "
                "model repository; build or copy the model file there."
            )
        _write_new_file(version / "model.py", ONNX_MODEL_PY.read_text())
    _write_new_file(
        model_dir / "config.pbtxt",
        "# Written by airflow_batch_infer's local runtime: an onnxruntime model served by the Python "
        "backend.\n" + text_format.MessageToString(config),
    )


# ------------------------------------------------------------------ start
