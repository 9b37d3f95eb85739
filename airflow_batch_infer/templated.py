"""Templated arguments as the operators use them: a value as given, or its text as a template rendered it.

Jinja renders to text unless the DAG sets ``render_template_as_native_obj``: a mapping or a list passed as
``"{{ params.inputs | tojson }}"`` arrives as JSON text, a number as its digits, an empty Param as ``""``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def _json(text: str, what: str, expected: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise ValueError(
            f'{what} must be {expected} or its JSON text (e.g. "{{{{ params.x | tojson }}}}"), '
            f"got {text!r}: {err}."
        ) from None


def as_mapping(value: Mapping[str, Any] | str | None, what: str) -> dict[str, Any]:
    """``value`` as a dict: given as one, or as its JSON text; ``None`` and ``""`` are empty.

    :param value: the argument, rendered.
    :param what: its name, for the error message.
    """
    if isinstance(value, str):
        value = _json(value, what, "a JSON object") if value.strip() else None
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{what} must be a mapping (or its JSON text), got {type(value).__name__}: {value!r}."
        )
    return dict(value)


def as_list(value: Sequence[str] | str | None, what: str) -> list[str]:
    """``value`` as a list of names: given as one, as its JSON text, or one bare name.

    :param value: the argument, rendered.
    :param what: its name, for the error message.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        value = _json(text, what, "a list of column names") if text.startswith("[") else [text]
    if value is None:
        return []
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of column names (or its JSON text), got {value!r}.")
    return list(value)


def as_optional_str(value: str | None) -> str | None:
    """``value``, with ``""`` (an empty Param rendered) read as ``None``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value.strip() if isinstance(value, str) else value


def as_optional_fraction(value: float | str | None, what: str) -> float | None:
    """``value`` as a fraction between 0 and 1, or ``None`` when not given (``None`` or ``""``).

    :param value: the argument, rendered.
    :param what: its name, for the error message.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number between 0 and 1, got {value!r}.") from None
    if not 0 <= fraction <= 1:
        raise ValueError(f"{what} must be between 0 and 1 (a share of the rows), got {fraction}.")
    return fraction


def all_items(values: Sequence[Any] | None) -> list[Any]:
    """Every item of a mapped task's results (``infer.output``), fetched at once.

    Airflow hands them as a lazy XCom sequence: each item read by index is a request of its own, through
    the task's supervisor to the API server, and iterating probes one item past the end; a slice is one
    request.

    :param values: the results, lazy or a plain list (``None``: none).
    """
    return list(values[:]) if values is not None else []
