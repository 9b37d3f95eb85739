"""The contract of a source: a description, what it knows before reading, and one stream of batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager

import pyarrow as pa


class Source(ABC):
    """Rows to stage, read once as a stream of Arrow record batches."""

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the rows come from, for the manifest and the log (never credentials)."""

    def schema(self) -> pa.Schema | None:
        """The columns, when known without reading the rows (``None``: known once opened)."""
        return None

    def count_rows(self) -> int | None:
        """The number of rows, when known without reading them (``None`` otherwise)."""
        return None

    @abstractmethod
    def open(self, columns: Sequence[str] | None = None) -> AbstractContextManager[pa.RecordBatchReader]:
        """Start reading: a context manager giving a reader of record batches.

        :param columns: the columns wanted (all when ``None``); a source that can read only those
            (Parquet) does so, the others return every column and the caller selects.
        """
