"""Arrow type tests shared by the column → tensor mapping, the run's Parquet writer and the sinks."""

from __future__ import annotations

import pyarrow as pa


def is_list(arrow_type: pa.DataType) -> bool:
    """A list column of any kind: variable, large or fixed-size."""
    return (
        pa.types.is_list(arrow_type)
        or pa.types.is_large_list(arrow_type)
        or pa.types.is_fixed_size_list(arrow_type)
    )
