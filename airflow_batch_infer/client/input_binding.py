"""Input binding: the mapping columns → input tensors, checked against the data and the model."""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from airflow_batch_infer.arrow_types import is_list
from airflow_batch_infer.client.tensors import (
    INT_TENSORS,
    RAGGED,
    TRITON_NUMPY,
    compatible,
    row_width,
)
from airflow_batch_infer.errors import ContractError


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
        width = row_width(spec["shape"], max_batch_size)
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
            if not compatible(value_type, datatype):
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
            if not compatible(arrow_type, datatype):
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
    if spec["datatype"] != "BYTES" or row_width(spec["shape"], max_batch_size) != 1:
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
    width = row_width(spec["shape"], max_batch_size)
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
