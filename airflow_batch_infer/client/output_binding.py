"""Output binding: output tensors → output columns, checked against the model's metadata.

An output tensor lands as one column (a scalar, or a list for a tensor of several values a row), as one
named column per value (``["p_benign", "p_malignant"]``), as chosen values only (``{1: "p_malignant"}``),
or, for an output whose config names a ``label_filename``, as the top-k class labels and scores that
Triton's classification extension answers (``label``, ``label_score``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from airflow_batch_infer.arrow_types import numeric_array
from airflow_batch_infer.client.output_mapping import (
    LABEL_COLUMN,
    OutputTarget,
    check_output_mapping,
    label_columns,
    target_columns,
)
from airflow_batch_infer.client.tensors import TRITON_NUMPY, row_width
from airflow_batch_infer.errors import ContractError


@dataclass(frozen=True)
class OutputBinding:
    """One model output written to one or more columns.

    :param tensor: output tensor name.
    :param datatype: Triton datatype of the tensor as the server returns it (``BYTES`` for labels).
    :param column: output column name (the whole tensor); unused when ``elements`` or ``class_count``.
    :param width: elements per row of the tensor; 1 gives a scalar column, more a fixed-size list column.
    :param elements: value index → column, one column per value kept; empty keeps the whole tensor.
    :param class_count: top-k labels asked of Triton's classification extension (0: the raw values).
    """

    tensor: str
    datatype: str
    column: str
    width: int
    elements: tuple[tuple[int, str], ...] = ()
    class_count: int = 0

    @property
    def columns(self) -> list[str]:
        """The output columns this binding writes, in order."""
        if self.class_count:
            return label_columns(self.class_count)
        if self.elements:
            return [name for _, name in self.elements]
        return [self.column]


def bind_outputs(
    outputs: Mapping[str, OutputTarget] | None,
    metadata: Mapping[str, Any],
    max_batch_size: int,
    *,
    top_k: int = 0,
    labelled_outputs: Sequence[str] = (),
) -> list[OutputBinding]:
    """Check the mapping ``tensor → output column(s)`` against the model's metadata.

    :param outputs: output tensor → column name, list of column names (one per value: the tensor's width
        must match), or value index → column name (chosen values only); ``None`` keeps every output
        under its own name.
    :param metadata: the server's model metadata.
    :param max_batch_size: the model's ``max_batch_size``.
    :param top_k: the k most likely class labels and their scores, from the output that names a
        ``label_filename`` in the model's config (Triton's classification extension); 0 for none.
    :param labelled_outputs: the model's outputs whose config names a ``label_filename``.
    :raises ContractError: naming the tensor, its width and the columns asked for.
    """
    model = metadata.get("name", "the model")
    declared = {t["name"]: t for t in metadata.get("outputs", [])}
    check_output_mapping(outputs)
    mapping: dict[str, Any] = dict(outputs) if outputs else {name: name for name in declared}
    bindings = []
    labelled = _labelled_output(model, top_k, labelled_outputs, declared)
    if labelled is not None:
        if outputs and labelled in mapping:
            raise ContractError(
                f"Output tensor {labelled!r} of model {model!r} is asked for both as values (outputs) and "
                f"as top_k={top_k} labels: Triton answers a tensor one way per request. Keep the labels "
                "(drop it from outputs), or keep the values and map them to labels in postprocess."
            )
        mapping.pop(labelled, None)
    for tensor, target in mapping.items():
        if tensor not in declared:
            raise ContractError(
                f"Model {model!r} has no output tensor {tensor!r}; its outputs are {sorted(declared)}."
            )
        spec = declared[tensor]
        width = row_width(spec["shape"], max_batch_size)
        width = width if width is not None else -1
        columns = target_columns(tensor, target)
        if isinstance(columns, tuple) and len(columns) == 1 and isinstance(target, str):
            bindings.append(OutputBinding(tensor, spec["datatype"], columns[0], width))
            continue
        picked = dict(enumerate(columns)) if isinstance(columns, tuple) else columns
        if width < 0:
            raise ContractError(
                f"Output tensor {tensor!r} of model {model!r} has a variable shape {spec['shape']}: it "
                "cannot be split into named columns; map it to one column."
            )
        if isinstance(columns, tuple) and len(columns) != width:
            raise ContractError(
                f"Output tensor {tensor!r} of model {model!r} holds {width} value(s) a row (shape "
                f"{spec['shape']}) but outputs names {len(columns)} column(s): {list(columns)}. Name one "
                f"column per value, or pick values with {{index: column}}, e.g. {{{tensor!r}: {{0: 'p'}}}}."
            )
        beyond = sorted(i for i in picked if i >= width)
        if beyond:
            raise ContractError(
                f"Output tensor {tensor!r} of model {model!r} holds {width} value(s) a row (shape "
                f"{spec['shape']}): there is no value at position(s) {beyond} (positions start at 0)."
            )
        elements = tuple(sorted(picked.items()))
        bindings.append(OutputBinding(tensor, spec["datatype"], elements[0][1], width, elements=elements))
    if labelled is not None:
        width = row_width(declared[labelled]["shape"], max_batch_size) or 0
        if top_k > width:
            raise ContractError(
                f"top_k={top_k} but output tensor {labelled!r} of model {model!r} has {width} classes."
            )
        bindings.append(OutputBinding(labelled, "BYTES", LABEL_COLUMN, top_k, class_count=top_k))
    names = [name for b in bindings for name in b.columns]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ContractError(f"Output column(s) {twice} are written twice: rename them in outputs.")
    return bindings


def _labelled_output(
    model: str, top_k: int, labelled_outputs: Sequence[str], declared: Mapping[str, Any]
) -> str | None:
    """The output that top-k labels come from (``None`` when no labels are asked for)."""
    if not top_k:
        return None
    if top_k < 0:
        raise ContractError(f"top_k must be a positive number of labels, not {top_k}.")
    labelled = [name for name in labelled_outputs if name in declared]
    if not labelled:
        raise ContractError(
            f"top_k={top_k} needs class labels, but no output of model {model!r} names a label_filename "
            "in its config.pbtxt: add one (a text file, a class name a line), or map the values to labels "
            "in postprocess."
        )
    if len(labelled) > 1:
        raise ContractError(
            f"top_k={top_k} is ambiguous: outputs {labelled} of model {model!r} all name a label_filename."
        )
    return labelled[0]


def output_fields(binding: OutputBinding) -> list[pa.Field]:
    """The part columns of a model output: never null (every row written has the model's answer)."""
    if binding.class_count:
        k = binding.class_count
        return [pa.field(n, pa.string(), nullable=False) for n in label_columns(k)[:k]] + [
            pa.field(n, pa.float32(), nullable=False) for n in label_columns(k)[k:]
        ]
    if binding.datatype == "BYTES":
        value_type = pa.string()
    else:
        value_type = pa.from_numpy_dtype(np.dtype(TRITON_NUMPY[binding.datatype]))
    if binding.elements:
        return [pa.field(name, value_type, nullable=False) for _, name in binding.elements]
    if binding.width == 1 or binding.datatype == "BYTES":
        return [pa.field(binding.column, value_type, nullable=False)]
    if binding.width > 1:
        return [pa.field(binding.column, pa.list_(value_type, binding.width), nullable=False)]
    return [pa.field(binding.column, pa.list_(value_type), nullable=False)]


def output_arrays(values: np.ndarray, binding: OutputBinding) -> list[pa.Array]:
    """The columns of one output tensor's values (``[rows, …]``), as :func:`output_fields` declares."""
    rows = values.shape[0]
    flat = values.reshape(rows, -1)
    if binding.class_count:
        return _label_arrays(flat, binding.class_count)
    if binding.elements:
        return [_output_array(flat[:, index : index + 1], binding) for index, _ in binding.elements]
    return [_output_array(flat, binding)]


def _output_array(values: np.ndarray, binding: OutputBinding) -> pa.Array:
    rows = values.shape[0]
    flat = values.reshape(rows, -1)
    if binding.datatype == "BYTES":
        items = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat[:, 0]]
        return pa.array(items, type=pa.string())
    array = numeric_array(flat.ravel())
    if flat.shape[1] == 1 and (binding.width == 1 or binding.elements):
        return array
    if binding.width > 1:
        return pa.FixedSizeListArray.from_arrays(array, flat.shape[1])
    offsets = numeric_array(np.arange(rows + 1, dtype=np.int32) * flat.shape[1])
    return pa.ListArray.from_arrays(offsets, array)  # a variable-length output


def _label_arrays(values: np.ndarray, top_k: int) -> list[pa.Array]:
    """Triton's ``score:index:label`` answers → ``top_k`` label columns, then ``top_k`` score columns."""
    import pyarrow.compute as pc  # here: the stage task's contract check imports this module for nothing else

    labels, scores = [], []
    for j in range(top_k):
        text = pa.array(values[:, j], type=pa.binary()).cast(pa.string())
        parts = pc.split_pattern(text, ":", max_splits=2)
        scores.append(pc.list_element(parts, 0).cast(pa.float32()))
        labels.append(pc.list_element(parts, 2))
    return labels + scores
