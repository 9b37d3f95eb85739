"""Input encoding: Arrow record batches → input tensors, finding the rows that cannot be sent."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from airflow_batch_infer.client.input_binding import InputBinding
from airflow_batch_infer.client.tensors import FLOAT_TENSORS, RAGGED, TRITON_NUMPY


def _column_values(column: pa.ChunkedArray | pa.Array, dtype: np.dtype) -> np.ndarray:
    """Column values as ``dtype``; null slots hold an arbitrary value (their rows are set aside)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        column = column.fill_null(0 if not pa.types.is_string(column.type) else "")
    if dtype == np.object_:
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return primitive_view(column).astype(dtype, copy=False)
    return column.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


_ARROW_FLOATS = {"halffloat": "float16", "float": "float32", "double": "float64"}


def primitive_view(array: pa.Array) -> np.ndarray:
    """A numpy view of a numeric Arrow array without nulls: no copy.

    ``Array.to_numpy`` goes through pyarrow's pandas shim, which imports pandas (a quarter of a second
    of a task's first chunk) even for a plain float column.
    """
    dtype = np.dtype(_ARROW_FLOATS.get(str(array.type), str(array.type)))
    data = array.buffers()[1]
    return np.frombuffer(data, dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _ragged_strings(column: pa.Array, name: str, reject: Callable[[np.ndarray, str], None]) -> np.ndarray:
    """A list-of-strings column as a ``[rows, longest]`` BYTES array padded with empty strings."""
    lists = column.to_pylist()
    bad = np.array([items is None or any(item is None for item in items) for items in lists], dtype=bool)
    if bad.any():
        reject(bad, f"null in column {name!r}")
    longest = max((len(items) for items in lists if items), default=0) or 1
    values = np.full((len(lists), longest), b"", dtype=object)
    for i, items in enumerate(lists):
        if items and not bad[i]:
            values[i, : len(items)] = [item.encode() if isinstance(item, str) else item for item in items]
    return values


def _target(into: Mapping[str, np.ndarray], binding: InputBinding, rows: int, dtype: np.dtype) -> np.ndarray:
    """The ``[rows, width]`` array a tensor is encoded into: the caller's when it fits, else a new one."""
    given = into.get(binding.tensor)
    if (
        given is not None
        and given.dtype == dtype
        and given.shape[1:] == (binding.width,)
        and len(given) >= rows
    ):
        return given[:rows]
    return np.empty((rows, binding.width), dtype=dtype)


def encode_batch(
    batch: pa.RecordBatch,
    bindings: Sequence[InputBinding],
    into: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[int, str]]:
    """Turn a record batch into input tensors, finding rows that cannot be sent.

    :param batch: rows to encode.
    :param bindings: checked input bindings.
    :param into: tensor → an array of at least ``rows`` rows to encode a fixed-size numeric tensor into
        (a shared memory region, say) instead of a new one.
    :return: tensors for all rows (``[rows, width]``), a boolean mask of good rows, and the reason each bad
        row is bad, by row number (nothing per good row: a read has tens of thousands).
    """
    n = batch.num_rows
    into = into or {}
    columns_by_name = dict(zip(batch.schema.names, batch.columns, strict=True))  # faster than by name
    good = np.ones(n, dtype=bool)
    reasons: dict[int, str] = {}

    def reject(mask: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(mask & good):
            reasons[int(i)] = reason
        good[mask] = False

    tensors: dict[str, np.ndarray] = {}
    for binding in bindings:
        dtype = np.dtype(TRITON_NUMPY[binding.datatype])
        if binding.constant is not None:
            if binding.datatype == "BYTES":
                tensors[binding.tensor] = np.tile(binding.constant, (n, 1))
            else:
                tensors[binding.tensor] = _target(into, binding, n, dtype)
                tensors[binding.tensor][...] = binding.constant
            continue
        if binding.template is not None:
            values = np.empty((n, 1), dtype=object)
            columns = {}
            for name in binding.columns:
                column = batch.column(name)
                if column.null_count:
                    reject(~np.asarray(column.is_valid()), f"null in column {name!r}")
                columns[name] = column.to_pylist()
            for i in range(n):
                row = {name: columns[name][i] for name in binding.columns}
                values[i, 0] = binding.template.format_map(row).encode() if good[i] else b""
            tensors[binding.tensor] = values
            continue
        if binding.list_column and binding.width == RAGGED:
            tensors[binding.tensor] = _ragged_strings(
                batch.column(binding.columns[0]), binding.columns[0], reject
            )
            continue
        if binding.list_column:
            column = batch.column(binding.columns[0])
            if column.null_count:
                reject(~np.asarray(column.is_valid()), f"null in column {binding.columns[0]!r}")
            lengths = pc.list_value_length(column).fill_null(binding.width).to_numpy(zero_copy_only=False)
            wrong = lengths != binding.width
            if wrong.any():
                reject(wrong, f"column {binding.columns[0]!r} does not hold {binding.width} values")
            values = _target(into, binding, n, dtype)
            values[...] = 0
            ok_rows = np.flatnonzero(good)
            if len(ok_rows):
                flat = pc.list_flatten(column.take(pa.array(ok_rows)))
                if flat.null_count:
                    per_row = np.asarray(flat.is_null()).reshape(-1, binding.width).any(axis=1)
                    inner_null = np.zeros(n, dtype=bool)
                    inner_null[ok_rows[per_row]] = True
                    reject(inner_null, f"null inside column {binding.columns[0]!r}")
                values[ok_rows] = _column_values(flat, dtype).reshape(-1, binding.width)
        else:
            values = _target(into, binding, n, dtype)
            # The columns side by side, then one transposing copy: numpy copies across in cache-sized
            # blocks, about half the CPU of writing each column into every width-th slot.
            wide = len(binding.columns) > 1
            gathered = np.empty((len(binding.columns), n), dtype=dtype) if wide else values.T
            for j, name in enumerate(binding.columns):
                column = columns_by_name[name]
                if column.null_count:
                    reject(~np.asarray(column.is_valid()), f"null in column {name!r}")
                gathered[j] = _column_values(column, dtype)
            if wide:
                values[...] = gathered.T
        # A NaN or an infinity makes the sum non-finite (a finite sum that overflows costs the full check).
        with np.errstate(over="ignore", invalid="ignore"):
            total = values.sum() if binding.datatype in FLOAT_TENSORS else 0
        if not np.isfinite(total):
            finite = np.isfinite(values)
            if not finite.all():
                bad_cells = ~finite
                for j in range(values.shape[1]):
                    col = binding.columns[0] if binding.list_column else binding.columns[j]
                    reject(bad_cells[:, j], f"NaN or infinite value in column {col!r}")
        tensors[binding.tensor] = values
    return tensors, good, reasons
