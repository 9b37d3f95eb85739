"""Column → tensor mapping: checked against the model's metadata, then applied to Arrow record batches."""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from airflow_batch_infer.arrow_types import is_list
from airflow_batch_infer.errors import BatchInferFailure

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


class ContractError(BatchInferFailure, ValueError):
    """The declared column → tensor mapping does not fit the data or the model served."""


@dataclass(frozen=True)
class InputBinding:
    """One model input fed from one or more columns.

    :param tensor: input tensor name.
    :param datatype: Triton datatype of the tensor (``FP32``, ``BYTES``, ...).
    :param columns: source columns; several scalar columns are stacked side by side.
    :param width: elements per row (the tensor's shape without the batch dimension, flattened).
    :param list_column: whether the single source column is a list column holding ``width`` values a row.
    :param template: a ``str.format`` template over the row's columns, rendered into a BYTES tensor
        (``columns`` then names the fields it uses).
    :param constant: the same value for every row (a scalar, or a list for a ``[-1]`` tensor).
    """

    tensor: str
    datatype: str
    columns: tuple[str, ...]
    width: int
    list_column: bool = False
    template: str | None = None
    constant: Any = None


@dataclass(frozen=True)
class OutputBinding:
    """One model output written to one column.

    :param tensor: output tensor name.
    :param datatype: Triton datatype of the tensor.
    :param column: output column name.
    :param width: elements per row; 1 gives a scalar column, more a fixed-size list column.
    """

    tensor: str
    datatype: str
    column: str
    width: int


def row_bytes(binding: InputBinding | OutputBinding) -> int:
    """Bytes of one row of a fixed-size tensor (``width`` values of its datatype)."""
    return binding.width * np.dtype(TRITON_NUMPY[binding.datatype]).itemsize


def _compatible(arrow_type: pa.DataType, datatype: str) -> bool:
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


def _row_width(shape: Sequence[int], max_batch_size: int) -> int | None:
    """Elements per row from a metadata shape (which includes the batch dim when batching); None if -1."""
    dims = list(shape)[1:] if max_batch_size > 0 else list(shape)
    width = 1
    for dim in dims:
        if int(dim) < 0:
            return None
        width *= int(dim)
    return width


def template_fields(template: str) -> tuple[str, ...]:
    """The column names a ``str.format`` template uses, in order, without repeats."""
    names: dict[str, None] = {}
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None:
            if not field or field.isdigit():
                raise ContractError(
                    f"Template {template!r} has a positional field: name the column, e.g. {{body}}."
                )
            names[field.split(".")[0].split("[")[0]] = None
    return tuple(names)


def bind_inputs(
    inputs: Mapping[str, str | Sequence[str]],
    schema: pa.Schema,
    metadata: Mapping[str, Any],
    max_batch_size: int,
    *,
    templates: Mapping[str, str] | None = None,
    constants: Mapping[str, Any] | None = None,
    optional: Iterable[str] = (),
) -> list[InputBinding]:
    """Check the mapping ``tensor → column(s)`` against the data's schema and the model's metadata.

    :param inputs: for each input tensor, a column name, or a list of scalar columns to stack.
    :param schema: Arrow schema of the staged chunk.
    :param metadata: the server's model metadata (``inputs`` with name, datatype, shape).
    :param max_batch_size: the model's ``max_batch_size`` (0: the model does not batch).
    :param templates: BYTES input tensor → ``str.format`` template over the row's columns (a prompt).
    :param constants: input tensor → one value for every row (a generation parameter, say).
    :param optional: input tensors the model lets the request leave out (``optional: true`` in its
        config).
    :raises ContractError: naming the column, the tensor and both types.
    """
    model = metadata.get("name", "the model")
    declared = {t["name"]: t for t in metadata.get("inputs", [])}
    templates, constants = dict(templates or {}), dict(constants or {})
    if max_batch_size <= 0:
        raise ContractError(
            f"Model {model!r} has max_batch_size 0: batch inference needs a model that batches "
            "(set max_batch_size in its config.pbtxt)."
        )
    given = [*inputs, *templates, *constants]
    twice = sorted({t for t in given if given.count(t) > 1})
    if twice:
        raise ContractError(
            f"Input tensor(s) {twice} are given more than one source (columns, template, constant)."
        )
    missing_tensors = sorted(set(declared) - set(given) - set(optional))
    if missing_tensors:
        raise ContractError(
            f"Model {model!r} needs input tensor(s) {missing_tensors} but the mapping gives none; "
            f"the model declares {sorted(declared)}."
        )
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ContractError(
            f"Model {model!r} has no input tensor(s) {unknown}; its inputs are {sorted(declared)}."
        )
    bindings = [
        _bind_template(t, text, declared[t], schema, model, max_batch_size) for t, text in templates.items()
    ]
    bindings += [
        _bind_constant(t, value, declared[t], model, max_batch_size) for t, value in constants.items()
    ]
    for tensor, source in inputs.items():
        if tensor not in declared:
            raise ContractError(
                f"Model {model!r} has no input tensor {tensor!r}; its inputs are {sorted(declared)}."
            )
        spec = declared[tensor]
        datatype = spec["datatype"]
        width = _row_width(spec["shape"], max_batch_size)
        columns = (source,) if isinstance(source, str) else tuple(source)
        for column in columns:
            if column not in schema.names:
                raise ContractError(
                    f"Column {column!r} (for input tensor {tensor!r}) is not in the data; "
                    f"columns present: {schema.names}."
                )
        if len(columns) == 1 and is_list(schema.field(columns[0]).type):
            field = schema.field(columns[0])
            value_type = field.type.value_type
            if not _compatible(value_type, datatype):
                raise ContractError(
                    f"Column {field.name!r} holds lists of {value_type} but input tensor {tensor!r} of "
                    f"model {model!r} is {datatype}."
                )
            list_size = getattr(field.type, "list_size", None)
            if width is None and datatype == "BYTES":
                # Word lists (stop words, say): each request is padded with empty strings to its longest.
                bindings.append(InputBinding(tensor, datatype, columns, RAGGED, list_column=True))
                continue
            if width is None:
                raise ContractError(
                    f"Input tensor {tensor!r} of model {model!r} has a variable shape {spec['shape']}: "
                    "numeric list columns need a fixed width."
                )
            if list_size is not None and list_size != width:
                raise ContractError(
                    f"Column {field.name!r} holds {list_size} values a row but input tensor {tensor!r} of "
                    f"model {model!r} takes {width} (shape {spec['shape']})."
                )
            bindings.append(InputBinding(tensor, datatype, columns, width, list_column=True))
            continue
        for column in columns:
            arrow_type = schema.field(column).type
            if not _compatible(arrow_type, datatype):
                raise ContractError(
                    f"Column {column!r} is {arrow_type} but input tensor {tensor!r} of model {model!r} "
                    f"is {datatype}: cast the column, or map another one."
                )
        if width is not None and width != len(columns):
            raise ContractError(
                f"Input tensor {tensor!r} of model {model!r} takes {width} values a row "
                f"(shape {spec['shape']}) but {len(columns)} column(s) are mapped to it: {list(columns)}."
            )
        bindings.append(InputBinding(tensor, datatype, columns, len(columns)))
    return bindings


def _bind_template(
    tensor: str, template: str, spec: Mapping[str, Any], schema: pa.Schema, model: str, max_batch_size: int
) -> InputBinding:
    if spec["datatype"] != "BYTES" or _row_width(spec["shape"], max_batch_size) != 1:
        raise ContractError(
            f"A template renders one string a row, but input tensor {tensor!r} of model {model!r} is "
            f"{spec['datatype']} with shape {spec['shape']}: use it for a BYTES tensor of shape [1]."
        )
    fields = template_fields(template)
    missing = [f for f in fields if f not in schema.names]
    if missing:
        raise ContractError(
            f"Template for input tensor {tensor!r} uses column(s) {missing} that are not in the data; "
            f"columns present: {schema.names}."
        )
    return InputBinding(tensor, "BYTES", fields, 1, template=template)


def _bind_constant(
    tensor: str, value: Any, spec: Mapping[str, Any], model: str, max_batch_size: int
) -> InputBinding:
    datatype = spec["datatype"]
    values = np.asarray(value if isinstance(value, list | tuple) else [value], dtype=object)
    width = _row_width(spec["shape"], max_batch_size)
    if width is not None and width != len(values):
        raise ContractError(
            f"Input tensor {tensor!r} of model {model!r} takes {width} value(s) a row "
            f"(shape {spec['shape']}) but the constant {value!r} has {len(values)}."
        )
    try:
        if datatype == "BYTES":
            typed = np.array(
                [str(v).encode() if not isinstance(v, bytes) else v for v in values], dtype=object
            )
        else:
            typed = values.astype(TRITON_NUMPY[datatype])
            if datatype in INT_TENSORS and not np.array_equal(typed, values.astype(float)):
                raise ValueError("not whole numbers")
    except (ValueError, TypeError, OverflowError) as error:
        raise ContractError(
            f"Constant {value!r} does not fit input tensor {tensor!r} of model {model!r} "
            f"({datatype}): {error}."
        ) from error
    return InputBinding(tensor, datatype, (), len(typed), constant=typed)


def bind_outputs(
    outputs: Mapping[str, str] | None, metadata: Mapping[str, Any], max_batch_size: int
) -> list[OutputBinding]:
    """Check the mapping ``tensor → output column`` against the model's metadata.

    :param outputs: output tensor → column name; ``None`` keeps every output under its own name.
    :param metadata: the server's model metadata.
    :param max_batch_size: the model's ``max_batch_size``.
    """
    model = metadata.get("name", "the model")
    declared = {t["name"]: t for t in metadata.get("outputs", [])}
    mapping = dict(outputs) if outputs else {name: name for name in declared}
    bindings = []
    for tensor, column in mapping.items():
        if tensor not in declared:
            raise ContractError(
                f"Model {model!r} has no output tensor {tensor!r}; its outputs are {sorted(declared)}."
            )
        spec = declared[tensor]
        width = _row_width(spec["shape"], max_batch_size)
        bindings.append(OutputBinding(tensor, spec["datatype"], column, width if width is not None else -1))
    return bindings


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
