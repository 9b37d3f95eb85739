"""The contract of a warehouse sink, and SQL identifier checking shared by all of them."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
REJECTS_SUFFIX = "_rejects"


class SchemaMismatchError(ValueError):
    """An existing table's columns do not fit the outputs; the message names the column."""


def validate_identifier(name: str, what: str = "identifier") -> str:
    """Refuse anything but a plain SQL identifier (letters, digits, underscore; 63 characters at most).

    :param name: the identifier, possibly from a DAG Param.
    :param what: what it names, for the error message (``table``, ``column``).
    """
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(
            f"Invalid {what} name {name!r}: use letters, digits and underscores, starting with a letter "
            "or underscore, at most 63 characters."
        )
    return name


def quote_identifier(name: str, what: str = "identifier") -> str:
    """Validate ``name`` and return it double-quoted for SQL."""
    return '"' + validate_identifier(name, what) + '"'


def qualified_table(table: str) -> str:
    """Quote ``table`` or ``schema.table``, each part validated."""
    parts = table.split(".")
    if len(parts) > 2:
        raise ValueError(f"Invalid table name {table!r}: use 'table' or 'schema.table'.")
    return ".".join(quote_identifier(p, "table") for p in parts)


@dataclass
class PersistResult:
    """What a sink wrote: small enough for XCom and the task log.

    :param table: the output table.
    :param rejects_table: the table of rows set aside.
    :param partition: the partition replaced.
    :param rows: rows now in the partition of ``table``.
    :param rejected: rows now in the partition of ``rejects_table``.
    :param replaced: rows the partition held before (0 on a first run).
    :param location: where the table lives (a database file, a URL without credentials).
    """

    table: str
    rejects_table: str
    partition: str
    rows: int
    rejected: int
    replaced: int
    location: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class WarehouseSink(ABC):
    """Replaces a run's partition of the output table (and of its rejects table) in one atomic step.

    :param table: output table (``table`` or ``schema.table``); rejects go to ``<table>_rejects``.
    :param partition_column: column holding the partition key.
    :param create_table: create the tables from the outputs' schema when they do not exist.
    """

    name: str

    def __init__(
        self, table: str, partition_column: str = "batch_partition", create_table: bool = True
    ) -> None:
        qualified_table(table)
        self.table = table
        self.rejects_table = table + REJECTS_SUFFIX
        self.partition_column = validate_identifier(partition_column, "partition column")
        self.create_table = create_table

    @abstractmethod
    def replace_partition(
        self, partition: str, output_parts: Sequence[Path], reject_parts: Sequence[Path]
    ) -> PersistResult:
        """Replace ``partition`` of the tables with the rows of the part files, all or nothing."""
