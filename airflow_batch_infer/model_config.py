"""A model's ``config.pbtxt`` as Triton's ``ModelConfig`` protobuf message, without the gRPC client's imports.

tritonclient ships the generated message module as ``tritonclient.grpc.model_config_pb2``. Importing it the
usual way runs ``tritonclient.grpc``'s package init first (grpc, numpy, ml_dtypes: 0.11 s on the demo's
machine), which the stage task's contract check and the local runtime's start need for nothing else; the
start task paid it before the server could even be launched. Here the module is loaded from its file under
its own name, so a later ``import tritonclient.grpc`` in the same process finds it and reuses it.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

_MODULE = "tritonclient.grpc.model_config_pb2"
_loading = threading.Lock()


def model_config_pb2() -> ModuleType:
    """tritonclient's generated ``model_config_pb2`` module (``ModelConfig``, ``DataType``, ...)."""
    with _loading:
        module = sys.modules.get(_MODULE)
        if module is not None:
            return module
        package = importlib.util.find_spec("tritonclient")  # finds it without running its __init__
        if package is None or not package.submodule_search_locations:
            raise ImportError("tritonclient is not installed: pip install 'tritonclient[grpc]'.")
        path = Path(next(iter(package.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
        spec = importlib.util.spec_from_file_location(_MODULE, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"Cannot load {_MODULE} from {path}.")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        # Registered once complete: a thread importing tritonclient.grpc meanwhile runs the file itself,
        # and protobuf gives both copies the same message classes.
        return sys.modules.setdefault(_MODULE, module)


def parse_model_config(text: str) -> Any:
    """The ``ModelConfig`` message of a ``config.pbtxt``'s text.

    :param text: the file's text (protobuf text format).
    :raises google.protobuf.text_format.ParseError: the text is not a valid ``ModelConfig``.
    """
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2().ModelConfig())
