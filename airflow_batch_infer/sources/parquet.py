"""ParquetSource: Parquet files or folders on local disk or object storage, hive partitions understood."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_infer import storage
from airflow_batch_infer.errors import StagingError
from airflow_batch_infer.sources.base import Source

if TYPE_CHECKING:
    import pyarrow.dataset as ds

T = TypeVar("T")
R = TypeVar("R")

#: What a dataset's discovery skips: files and folders whose names start so (``_SUCCESS``, ``.crc``).
IGNORED_PREFIXES = (".", "_")


@dataclass(frozen=True)
class SourceFile:
    """One Parquet file of a source.

    :param location: what :mod:`~airflow_batch_infer.storage` opens: the local path, or the URL with the
        input's connection (``s3://conn@bucket/key``).
    :param metadata: its footer.
    :param partition: hive partition column → value, from its folders' names (``country=DE/``).
    :param pin: its ``size`` and ``version`` (:func:`~airflow_batch_infer.storage.pin`), taken before its
        footer was read; ``None`` when the footer came from the dataset's discovery, unpinned.
    """

    location: str
    metadata: pq.FileMetaData
    partition: dict[str, Any] = field(default_factory=dict)
    pin: dict[str, Any] | None = None


class ParquetSource(Source):
    """Parquet files or folders, read as one dataset; only the columns asked for are read.

    Folders named ``key=value`` (hive partitioning) become columns. On object storage the files are
    reached through Airflow's ``ObjectStoragePath`` and the given connection, with range reads: a column
    subset reads those columns' pages and the footers, not whole files.

    Files without hive folders are found by listing them and reading their footers (pinned first): a
    snapshot by reference then needs nothing more, and ``pyarrow.dataset``, whose import costs a stage
    task 0.3 s (it imports pandas), is opened only to copy rows, to prune row groups by a filter, or to
    read hive partitions.

    :param path: a file, a folder, or a list of them; local paths or URLs (``s3://bucket/prefix``).
    :param conn_id: the Airflow connection for URLs (an ``aws`` connection for ``s3://``); a URL may
        also name it itself, as ``s3://conn_id@bucket/prefix``.
    :param batch_rows: rows per record batch read.
    """

    def __init__(
        self, path: str | Path | Sequence[str | Path], conn_id: str | None = None, batch_rows: int = 65_536
    ) -> None:
        paths = [path] if isinstance(path, str | Path) else list(path)
        if not paths:
            raise StagingError("No input path given.")
        self.paths = [storage.location(p, conn_id) for p in paths]
        self.batch_rows = batch_rows
        self._described = str(path) if isinstance(path, str | Path) else str([str(p) for p in path])
        self._check_paths()
        listed = self._listed_files()
        self._files: list[SourceFile] | None = None
        if listed is not None:
            self._files = _read_footers(listed)
            self._schema = _common_schema([(f.location, _arrow_schema(f)) for f in self._files])
        else:
            self._schema = self.dataset.schema

    @property
    def description(self) -> str:
        return self._described

    def _check_paths(self) -> None:
        remote = [storage.is_remote(p) for p in self.paths]
        if any(remote) and not all(remote):
            raise StagingError(f"Input {self._described} mixes local paths and URLs; stage them apart.")
        for path in self.paths:
            if not storage.exists(path):
                raise StagingError(f"Input {path} does not exist.")
        if all(remote) and len({id(storage.filesystem(p)[0]) for p in self.paths}) > 1:
            raise StagingError(f"Input {self._described} spans several stores or connections.")

    def _listed_files(self) -> list[str] | None:
        """Every file of the input, sorted, skipping :data:`IGNORED_PREFIXES`; ``None`` when a folder
        below an input path is a hive partition (``key=value``): the dataset's discovery reads those."""
        found = []
        for path in self.paths:
            if storage.is_file(path):
                found.append(path)
                continue
            base = str(path).rstrip("/")
            for name in storage.list_files(path):
                parts = name[len(base) + 1 :].split("/")
                if any(p.startswith(IGNORED_PREFIXES) for p in parts):
                    continue
                if any("=" in p for p in parts[:-1]):
                    return None
                found.append(name)
        return sorted(found)

    @functools.cached_property
    def dataset(self) -> ds.Dataset:
        """The files as a ``pyarrow.dataset`` (hive partitions as columns), opened on first use."""
        import pyarrow.dataset as ds

        if all(storage.is_remote(p) for p in self.paths):  # one store: _check_paths saw to it
            filesystems = [storage.filesystem(p) for p in self.paths]
            names = [name for _, name in filesystems]
            target = names if len(names) > 1 else names[0]
            filesystem = storage.arrow_filesystem(filesystems[0][0])
        else:
            target, filesystem = (self.paths if len(self.paths) > 1 else self.paths[0]), None
        try:
            dataset = ds.dataset(target, filesystem=filesystem, format="parquet", partitioning="hive")
            fragments = list(dataset.get_fragments())
            _at_once(lambda f: f.ensure_complete_metadata(), fragments)
            _common_schema(
                [(f.path, f.physical_schema) for f in fragments],
                dataset.schema,
                {f.path: list(_partition_values(f)) for f in fragments},
            )
        except (pa.ArrowInvalid, OSError) as err:
            raise StagingError(f"Cannot read {self._described} as Parquet: {err}") from err
        return dataset

    def check_columns(self, columns: Sequence[str] | None) -> None:
        """Refuse columns the files do not have, naming them and the columns present."""
        if columns:
            names = self.schema().names
            missing = [c for c in columns if c not in names]
            if missing:
                raise StagingError(
                    f"Column(s) {missing} are not in the input {self._described}; columns present: {names}."
                )

    def schema(self) -> pa.Schema:
        return self._schema

    def files(self) -> list[SourceFile]:
        """Every file of the input, sorted by location."""
        if self._files is not None:
            return self._files
        found = [
            SourceFile(self._location_of(f.path), f.metadata, _partition_values(f))
            for f in self.dataset.get_fragments()
        ]
        return sorted(found, key=lambda f: f.location)

    def fragment(self, location: str) -> ds.ParquetFileFragment:
        """The dataset's fragment of the file at ``location`` (to prune its row groups by a filter)."""
        try:
            return self._fragments[location]
        except KeyError:
            raise StagingError(f"File {location} is not in the input {self._described}.") from None

    @functools.cached_property
    def _fragments(self) -> dict[str, ds.ParquetFileFragment]:
        return {self._location_of(f.path): f for f in self.dataset.get_fragments()}

    def _location_of(self, fs_path: str) -> str:
        if not storage.is_remote(self.paths[0]):
            return fs_path
        for path in self.paths:
            base = storage.filesystem(path)[1].rstrip("/")
            if fs_path == base or fs_path.startswith(base + "/"):
                return str(path).rstrip("/") + fs_path[len(base) :]
        raise StagingError(f"File {fs_path} is not below any input path of {self._described}.")

    def count_rows(self) -> int:
        if self._files is not None:
            return sum(f.metadata.num_rows for f in self._files)
        try:
            return self.dataset.count_rows()
        except (pa.ArrowInvalid, OSError) as err:
            raise StagingError(f"Cannot read the input {self._described}: {err}") from err

    @contextmanager
    def open(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatchReader]:
        self.check_columns(columns)
        scanner = self.dataset.scanner(columns=list(columns) if columns else None, batch_size=self.batch_rows)
        yield pa.RecordBatchReader.from_batches(scanner.projected_schema, self._batches(scanner))

    def _batches(self, scanner: ds.Scanner) -> Iterator[pa.RecordBatch]:
        try:
            yield from scanner.to_batches()
        except (pa.ArrowInvalid, OSError) as err:
            raise StagingError(f"Cannot read the input: {err}") from err


def _at_once(function: Callable[[T], R], items: list[T]) -> list[R]:
    """``function`` of each item, in threads: reading a footer waits on I/O, parsing it releases the GIL."""
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(16, len(items))) as pool:
        return list(pool.map(function, items))


def _read_footers(locations: list[str]) -> list[SourceFile]:
    """Each file pinned, then its footer read, several files at once."""

    def read(location: str) -> SourceFile:
        pin = storage.pin(location)
        try:
            if storage.is_remote(location):
                with storage.open_input(location) as handle:
                    metadata = pq.read_metadata(handle)
            else:
                metadata = pq.read_metadata(location)
        except (pa.ArrowInvalid, OSError) as err:
            raise StagingError(f"Cannot read {location} as Parquet: {err}") from err
        return SourceFile(location, metadata, pin=pin)

    return _at_once(read, locations)


def _arrow_schema(source_file: SourceFile) -> pa.Schema:
    try:
        return source_file.metadata.schema.to_arrow_schema()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise StagingError(f"Cannot read the columns of {source_file.location}: {err}") from err


def _common_schema(
    schemas: list[tuple[str, pa.Schema]],
    expected: pa.Schema | None = None,
    partition_keys: dict[str, list[str]] | None = None,
) -> pa.Schema:
    """The input's columns: those of its first file (``expected`` where the dataset has them, with its
    partition columns); refuse files whose columns differ, which Arrow would otherwise fill with nulls, or
    fail on deep inside the scan.

    :param schemas: each file's location and columns.
    :param expected: the columns to hold the files to (default: the first file's).
    :param partition_keys: each file's hive partition columns, which its own columns lack.
    """
    if expected is None:
        expected = schemas[0][1] if schemas else pa.schema([])
    for location, found in schemas:
        for column in found:
            wanted = expected.field(column.name) if column.name in expected.names else None
            if wanted is None:
                raise StagingError(
                    f"File {location} has a column {column.name!r} ({column.type}) that the first file "
                    f"does not have; columns expected: {expected.names}. Give files of one schema."
                )
            if not wanted.type.equals(column.type):
                raise StagingError(
                    f"Column {column.name!r} is {column.type} in {location} but {wanted.type} in the "
                    "first file: the input files' schemas disagree. Cast the column in the ETL, or stage "
                    "them apart."
                )
        keys = (partition_keys or {}).get(location, [])
        lacking = set(expected.names) - set(found.names) - set(keys)
        if lacking:
            raise StagingError(
                f"File {location} lacks column(s) {sorted(lacking)} that the first file has: "
                "the input files' schemas disagree."
            )
    return expected


def _partition_values(fragment: ds.Fragment) -> dict[str, Any]:
    """Hive partition column → value, from the fragment's folder names (``country=DE/`` → ``DE``;
    ``country=__HIVE_DEFAULT_PARTITION__/`` → ``None``)."""
    import pyarrow.dataset as ds

    expression = fragment.partition_expression
    return {} if expression is None else dict(ds.get_partition_keys(expression))
