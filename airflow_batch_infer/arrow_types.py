"""Arrow type tests shared by the column → tensor mapping, the run's Parquet writer and the sinks; numpy
memory as Arrow arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def is_list(arrow_type: pa.DataType) -> bool:
    """A list column of any kind: variable, large or fixed-size."""
    return (
        pa.types.is_list(arrow_type)
        or pa.types.is_large_list(arrow_type)
        or pa.types.is_fixed_size_list(arrow_type)
    )


def numeric_array(values: np.ndarray) -> pa.Array:
    """An Arrow array over a 1-D numeric numpy array's memory.

    ``pa.array`` would do the same, but imports pandas first whenever pandas is installed: 0.2 s of each
    infer task, on its way to the first request.
    """
    values = np.ascontiguousarray(values)
    if values.dtype == np.bool_:  # Arrow packs booleans as bits
        packed = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(packed)])
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def constant_array(value: Any, arrow_type: pa.DataType, rows: int) -> pa.Array:
    """``rows`` copies of ``value`` as ``arrow_type``: a hive partition's value, for each row of a file.

    Numbers, text and nulls are built from their bytes: ``pa.scalar`` and ``pa.array``, which convert
    Python values, import pandas first whenever pandas is installed (0.2 s). Other types go through them.

    :param value: the value (``None``: nulls).
    :param arrow_type: its Arrow type.
    :param rows: how many.
    """
    if value is None:
        return pa.nulls(rows, arrow_type)
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return numeric_array(np.full(rows, value, dtype=arrow_type.to_pandas_dtype()))
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        data = str(value).encode()
        offsets = np.array(
            [0, len(data)], dtype=np.int64 if pa.types.is_large_string(arrow_type) else np.int32
        )
        one = pa.Array.from_buffers(arrow_type, 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
        return pa.repeat(one[0], rows)
    return pa.repeat(pa.scalar(value, arrow_type), rows)
