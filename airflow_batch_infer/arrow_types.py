"""Arrow type tests shared by the column → tensor mapping, the run's Parquet writer and the sinks; numpy
memory as Arrow arrays."""

from __future__ import annotations

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
