"""The shape of an ``outputs`` mapping, checked without the model: when the DAG is parsed.

Kept apart from :mod:`~airflow_batch_infer.client.output_binding` (which needs numpy and Arrow) so that a
DAG file's parse, which every task process repeats, imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

from airflow_batch_infer.errors import ContractError

LABEL_COLUMN = "label"
LABEL_SCORE_COLUMN = "label_score"

# What an output tensor may map to: a column, one column per value, or value index → column.
OutputTarget = Union[str, Sequence[str], Mapping[int, str]]  # noqa: UP007 (a runtime alias on py3.10)


def label_columns(top_k: int) -> list[str]:
    """``label`` and ``label_score`` for the top class; ``label_1``…``label_k`` then scores for k > 1."""
    if top_k == 1:
        return [LABEL_COLUMN, LABEL_SCORE_COLUMN]
    numbers = range(1, top_k + 1)
    return [f"{LABEL_COLUMN}_{i}" for i in numbers] + [f"{LABEL_SCORE_COLUMN}_{i}" for i in numbers]


def target_columns(tensor: str, target: Any) -> tuple[str, ...] | dict[int, str]:
    """One tensor's target, checked for shape: a column name, a list of names, or index → name."""
    if isinstance(target, str):
        if not target:
            raise ContractError(f"outputs[{tensor!r}] is an empty column name.")
        return (target,)
    if isinstance(target, Mapping):
        picked: dict[int, str] = {}
        for key, name in target.items():
            index = int(key) if isinstance(key, str) and key.isdigit() else key
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ContractError(
                    f"outputs[{tensor!r}] keys are value positions (0, 1, …), not {key!r}: e.g. "
                    f"{{{tensor!r}: {{1: 'p_positive'}}}}."
                )
            if not isinstance(name, str) or not name:
                raise ContractError(f"outputs[{tensor!r}][{index}] must be a column name, not {name!r}.")
            picked[index] = name
        if not picked:
            raise ContractError(f"outputs[{tensor!r}] picks no values: name at least one {{index: column}}.")
        return picked
    if isinstance(target, Sequence) and target and all(isinstance(n, str) and n for n in target):
        return tuple(target)
    raise ContractError(
        f"outputs[{tensor!r}] must be a column name, a list of column names (one per value of the tensor) "
        f"or {{value index: column name}}, not {target!r}."
    )


def check_output_mapping(outputs: Mapping[str, Any] | None) -> None:
    """Check the shape of an ``outputs`` mapping without the model (when the DAG is parsed).

    :param outputs: output tensor → column, list of columns, or value index → column.
    :raises ContractError: naming the tensor and what to write instead.
    """
    if outputs is None:
        return
    if not isinstance(outputs, Mapping):
        raise ContractError(f"outputs must map output tensor → column(s), not {outputs!r}.")
    seen: dict[str, str] = {}
    for tensor, target in outputs.items():
        columns = target_columns(tensor, target)
        for name in columns.values() if isinstance(columns, dict) else columns:
            if name in seen:
                raise ContractError(
                    f"Output column {name!r} is named twice (outputs of {seen[name]!r} and {tensor!r}): "
                    "give each column its own name."
                )
            seen[name] = tensor
