"""A row filter for Parquet sources (``filter=``): only the rows it keeps are scored.

A filter is a pyarrow dataset expression (``pc.field("country") == "DE"``) or a SQL-like string
(``"country = 'DE' AND amount > 10"``). A string is parsed by DuckDB's parser (nothing is executed) and
only a safe subset is accepted: column names, literals, comparisons, ``AND``/``OR``/``NOT``,
``IN (...)``, ``BETWEEN`` and ``IS [NOT] NULL``; anything else is refused at parse time with the part
that is not allowed. A row for which the filter is null (a comparison with a null) is filtered out, as in
SQL's ``WHERE``.

The filter travels in the manifest as a :class:`RowFilter`: its text, the columns it reads and the
expression bound to those columns, serialised as Substrait (so an infer task evaluates exactly what stage
checked).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from airflow_batch_infer.errors import StagingError

if TYPE_CHECKING:
    import pyarrow.compute as pc  # imported where used: it costs a task without a filter 0.03-0.06 s

_COMPARISONS = {
    "COMPARE_EQUAL": lambda a, b: a == b,
    "COMPARE_NOTEQUAL": lambda a, b: a != b,
    "COMPARE_LESSTHAN": lambda a, b: a < b,
    "COMPARE_GREATERTHAN": lambda a, b: a > b,
    "COMPARE_LESSTHANOREQUALTO": lambda a, b: a <= b,
    "COMPARE_GREATERTHANOREQUALTO": lambda a, b: a >= b,
}
_ALLOWED = (
    "column names, literals (numbers, 'strings', true/false, DATE '...'), = <> < > <= >=, AND, OR, NOT, "
    "IN (...), BETWEEN and IS [NOT] NULL"
)
_FIELD_PATH = re.compile(r"FieldPath\((\d+)\)")


class FilterError(StagingError):
    """A ``filter=`` that cannot be used: bad syntax, a part outside the safe subset, an unknown column."""


@dataclass(frozen=True)
class RowFilter:
    """A filter ready to apply, as stored in the manifest.

    :param text: the filter as the user wrote it (or the expression's text), for logs and the report.
    :param columns: the columns it reads, in the order the serialised expression refers to them.
    :param substrait: the expression bound to ``columns``, Substrait bytes in base64.
    :param named: the expression with columns by name (at stage only: to prune row groups).
    """

    text: str
    columns: list[str]
    substrait: str
    named: pc.Expression | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "columns": self.columns, "substrait": self.substrait}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RowFilter | None:
        return cls(**data) if data else None

    def expression(self) -> pc.Expression:
        """The expression; it refers to :attr:`columns` by position: a batch's first columns."""
        import pyarrow.compute as pc

        return pc.Expression.from_substrait(base64.b64decode(self.substrait))

    def mask(self, batch: pa.RecordBatch) -> pa.BooleanArray:
        """Which rows of ``batch`` the filter keeps (null counts as not kept)."""
        first = pa.RecordBatch.from_arrays([batch.column(c) for c in self.columns], self.columns)
        marked = first.append_column("__position", pa.array(range(batch.num_rows), pa.int64()))
        kept = marked.filter(self.expression()).column("__position")
        values = np.zeros(batch.num_rows, dtype=bool)
        values[kept.to_numpy(zero_copy_only=False)] = True
        return pa.array(values)


def parse_filter(value: str | pc.Expression | None, schema: pa.Schema) -> RowFilter | None:
    """Check ``filter=`` against the input's ``schema`` and bind it; ``None`` or ``""`` for no filter.

    :param value: a pyarrow dataset expression or a SQL-like string (see the module's docstring).
    :param schema: the input's columns (hive partition columns included).
    :raises FilterError: naming the problem: syntax, a part not allowed, a column the input lacks.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    import pyarrow.compute as pc

    if isinstance(value, str):
        expression, text = sql_to_expression(value), value.strip()
    elif isinstance(value, pc.Expression):
        expression, text = value, str(value)
    else:
        raise FilterError(
            f"filter must be a SQL-like string or a pyarrow dataset expression, got {type(value).__name__}."
        )
    try:
        bound = pc.Expression.from_substrait(bytes(expression.to_substrait(schema)))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
        missing = re.search(r"No match for FieldRef.Name\((.*?)\)", str(error))
        if missing:
            raise FilterError(
                f"filter {text!r} names column {missing.group(1)!r}, which the input lacks; columns "
                f"present: {schema.names}."
            ) from error
        raise FilterError(
            f"filter {text!r} does not fit the input's columns {schema.names}: {error}. Name existing "
            "columns and compare them with values of their type."
        ) from error
    used = sorted({int(i) for i in _FIELD_PATH.findall(str(bound))})
    if not used:
        raise FilterError(f"filter {text!r} names no column: it would keep all rows or none.")
    narrowed = pa.schema([schema.field(i) for i in used])
    data = base64.b64encode(bytes(expression.to_substrait(narrowed))).decode()
    return RowFilter(text=text, columns=narrowed.names, substrait=data, named=expression)


def sql_to_expression(text: str) -> pc.Expression:
    """A pyarrow expression from a SQL-like condition (DuckDB parses it; nothing runs).

    :param text: the condition, as after ``WHERE``.
    :raises FilterError: on a syntax error or a part outside the safe subset.
    """
    import duckdb  # only where a filter is given: every task process parses the DAG that imports this

    try:
        tree = json.loads(
            duckdb.execute("SELECT json_serialize_sql(?)", [f"SELECT * FROM t WHERE {text}"]).fetchone()[0]
        )
    except duckdb.Error as error:
        raise FilterError(f"filter {text!r} is not a valid condition: {error}") from error
    if tree.get("error"):
        raise FilterError(
            f"filter {text!r} is not a valid condition ({tree.get('error_message')}); allowed: {_ALLOWED}."
        )
    statements = tree.get("statements") or []
    node = statements[0]["node"] if len(statements) == 1 else {}
    extra = (
        node.get("modifiers") or node.get("group_expressions") or node.get("having") or node.get("qualify")
    )
    if not node or extra or node.get("sample") or node.get("where_clause") is None:
        raise FilterError(
            f"filter {text!r} must be a single condition (as after WHERE), with no LIMIT, GROUP BY or "
            "other clause."
        )
    return _expression(node["where_clause"], text)


def _expression(node: dict[str, Any], text: str) -> Any:
    import pyarrow.compute as pc

    kind, cls = node.get("type", ""), node.get("class", "")
    children = node.get("children") or []
    if kind == "COLUMN_REF":
        names = node["column_names"]
        if len(names) != 1:
            raise FilterError(f"filter {text!r}: name columns without a table ({'.'.join(names)}).")
        return pc.field(names[0])
    if cls in ("CONSTANT", "CAST"):
        return _literal(node, text)
    if kind in _COMPARISONS:
        return _COMPARISONS[kind](_expression(node["left"], text), _expression(node["right"], text))
    if kind in ("CONJUNCTION_AND", "CONJUNCTION_OR"):
        parts = [_expression(c, text) for c in children]
        combined = parts[0]
        for part in parts[1:]:
            combined = combined & part if kind == "CONJUNCTION_AND" else combined | part
        return combined
    if kind == "OPERATOR_NOT":
        return ~_expression(children[0], text)
    if kind in ("OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL"):
        tested = _expression(children[0], text)
        return tested.is_null() if kind == "OPERATOR_IS_NULL" else ~tested.is_null()
    if kind in ("COMPARE_IN", "COMPARE_NOT_IN"):
        values = [_literal(c, text) for c in children[1:]]
        found = _expression(children[0], text).isin(values)
        return found if kind == "COMPARE_IN" else ~found
    if kind == "COMPARE_BETWEEN":
        tested = _expression(node["input"], text)
        return (tested >= _expression(node["lower"], text)) & (tested <= _expression(node["upper"], text))
    shown = node.get("function_name") or kind.lower()
    raise FilterError(f"filter {text!r}: {shown!r} is not allowed in a filter; allowed: {_ALLOWED}.")


def _literal(node: dict[str, Any], text: str) -> Any:
    """A literal's Python value: a number, a string, a boolean, a date (``DATE '2024-01-31'``)."""
    if node.get("class") == "CAST":
        target = (node.get("type_expr") or {}).get("type_name", "").upper()
        child = node.get("child") or {}
        if target == "DATE" and child.get("class") == "CONSTANT":
            return date.fromisoformat(child["literal"]["text"])
        raise FilterError(f"filter {text!r}: only DATE '...' casts are allowed; allowed: {_ALLOWED}.")
    if node.get("class") != "CONSTANT":
        raise FilterError(f"filter {text!r}: IN (...) takes literal values only.")
    literal = node["literal"]
    kind, value = literal.get("kind"), literal.get("text")
    if kind in ("INTEGER", "BIGINT", "HUGEINT", "SMALLINT", "TINYINT", "UBIGINT"):
        return int(value)
    if kind in ("NUMERIC", "DECIMAL", "DOUBLE", "FLOAT"):
        return float(Decimal(value))
    if kind in ("STRING", "VARCHAR"):
        return value
    if kind == "BOOLEAN":
        return value.lower() == "true"
    if kind in ("NULL", "NULL_LITERAL"):
        raise FilterError(f"filter {text!r}: compare with NULL through IS NULL or IS NOT NULL.")
    raise FilterError(f"filter {text!r}: a {kind} literal is not allowed; allowed: {_ALLOWED}.")
