"""Column → tensor contract: Triton datatypes, widths, and the error a mismatch raises.

The bindings live by idea in their own modules (:mod:`.input_binding` checks the columns → input tensors
mapping, :mod:`.encoding` turns record batches into tensors, :mod:`.output_binding` turns output tensors
into columns); their public names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from airflow_batch_infer.errors import ContractError as ContractError  # where callers have imported it from

if TYPE_CHECKING:
    from airflow_batch_infer.client.input_binding import InputBinding
    from airflow_batch_infer.client.output_binding import OutputBinding

# Triton datatype → numpy dtype (BYTES travels as numpy object arrays).
TRITON_NUMPY = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
FLOAT_TENSORS = {"FP16", "FP32", "FP64"}
RAGGED = -1  # width of a BYTES input fed from a list column of varying length
INT_TENSORS = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


def row_bytes(binding: InputBinding | OutputBinding) -> int:
    """Bytes of one row of a fixed-size tensor (``width`` values of its datatype)."""
    return binding.width * np.dtype(TRITON_NUMPY[binding.datatype]).itemsize


def compatible(arrow_type: pa.DataType, datatype: str) -> bool:
    if datatype in FLOAT_TENSORS:
        return pa.types.is_floating(arrow_type) or pa.types.is_integer(arrow_type)
    if datatype in INT_TENSORS:
        return pa.types.is_integer(arrow_type)
    if datatype == "BOOL":
        return pa.types.is_boolean(arrow_type)
    if datatype == "BYTES":
        return (
            pa.types.is_string(arrow_type)
            or pa.types.is_large_string(arrow_type)
            or pa.types.is_binary(arrow_type)
        )
    return False


def row_width(shape: Sequence[int], max_batch_size: int) -> int | None:
    """Elements per row from a metadata shape (which includes the batch dim when batching); None if -1."""
    dims = list(shape)[1:] if max_batch_size > 0 else list(shape)
    width = 1
    for dim in dims:
        if int(dim) < 0:
            return None
        width *= int(dim)
    return width


# Public names of the binding modules, importable from here as before the split (loaded on first use: the
# binding modules import this one).
_MOVED = {
    "InputBinding": "input_binding",
    "bind_inputs": "input_binding",
    "template_fields": "input_binding",
    "encode_batch": "encoding",
    "primitive_view": "encoding",
    "OutputBinding": "output_binding",
    "bind_outputs": "output_binding",
    "check_output_mapping": "output_mapping",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"airflow_batch_infer.client.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
