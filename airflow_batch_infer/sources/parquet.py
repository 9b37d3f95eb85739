"""ParquetSource: Parquet files or folders on local disk or object storage, hive partitions understood."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from airflow_batch_infer import storage
from airflow_batch_infer.errors import StagingError
from airflow_batch_infer.sources.base import Source


class ParquetSource(Source):
    """Parquet files or folders, read as one dataset; only the columns asked for are read.

    Folders named ``key=value`` (hive partitioning) become columns. On object storage the files are
    reached through Airflow's ``ObjectStoragePath`` and the given connection, with range reads: a column
    subset reads those columns' pages and the footers, not whole files.

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
        self.dataset = self._open_dataset()

    @property
    def description(self) -> str:
        return self._described

    def _open_dataset(self) -> ds.Dataset:
        remote = [storage.is_remote(p) for p in self.paths]
        if any(remote) and not all(remote):
            raise StagingError(f"Input {self._described} mixes local paths and URLs; stage them apart.")
        for path in self.paths:
            if not storage.exists(path):
                raise StagingError(f"Input {path} does not exist.")
        if all(remote):
            filesystems = [storage.filesystem(p) for p in self.paths]
            fs = filesystems[0][0]
            if any(other is not fs for other, _ in filesystems):
                raise StagingError(f"Input {self._described} spans several stores or connections.")
            names = [name for _, name in filesystems]
            target, filesystem = (names if len(names) > 1 else names[0]), storage.arrow_filesystem(fs)
        else:
            target, filesystem = (self.paths if len(self.paths) > 1 else self.paths[0]), None
        try:
            dataset = ds.dataset(target, filesystem=filesystem, format="parquet", partitioning="hive")
            _check_files_agree(dataset)
        except (pa.ArrowInvalid, OSError) as err:
            raise StagingError(f"Cannot read {self._described} as Parquet: {err}") from err
        return dataset

    def check_columns(self, columns: Sequence[str] | None) -> None:
        """Refuse columns the files do not have, naming them and the columns present."""
        if columns:
            names = self.dataset.schema.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise StagingError(
                    f"Column(s) {missing} are not in the input {self._described}; columns present: {names}."
                )

    def schema(self) -> pa.Schema:
        return self.dataset.schema

    def files(self) -> list[tuple[str, ds.ParquetFileFragment]]:
        """Every file of the input as (location, fragment), sorted by location.

        A location is what :mod:`~airflow_batch_infer.storage` opens: the local path, or the URL with the
        input's connection (``s3://conn@bucket/key``).
        """
        found = []
        for fragment in self.dataset.get_fragments():
            found.append((self._location_of(fragment.path), fragment))
        return sorted(found, key=lambda pair: pair[0])

    def _location_of(self, fs_path: str) -> str:
        if not storage.is_remote(self.paths[0]):
            return fs_path
        for path in self.paths:
            base = storage.filesystem(path)[1].rstrip("/")
            if fs_path == base or fs_path.startswith(base + "/"):
                return str(path).rstrip("/") + fs_path[len(base) :]
        raise StagingError(f"File {fs_path} is not below any input path of {self._described}.")

    def count_rows(self) -> int:
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


def _check_files_agree(dataset: ds.Dataset) -> None:
    """Refuse files whose columns differ from the dataset's (taken from its first file).

    Arrow would otherwise fill a missing column with nulls, or fail deep inside the scan.
    """
    expected = dataset.schema
    fragments = list(dataset.get_fragments())
    if len(fragments) > 1:  # read the footers at once: parsing one releases the GIL, reading waits on I/O
        with ThreadPoolExecutor(min(16, len(fragments))) as pool:
            list(pool.map(lambda f: f.ensure_complete_metadata(), fragments))
    for fragment in fragments:
        found = fragment.physical_schema
        for field in found:
            wanted = expected.field(field.name) if field.name in expected.names else None
            if wanted is None:
                raise StagingError(
                    f"File {fragment.path} has a column {field.name!r} ({field.type}) that the first file "
                    f"does not have; columns expected: {expected.names}. Give files of one schema."
                )
            if not wanted.type.equals(field.type):
                raise StagingError(
                    f"Column {field.name!r} is {field.type} in {fragment.path} but {wanted.type} in the "
                    "first file: the input files' schemas disagree. Cast the column in the ETL, or stage "
                    "them apart."
                )
        partition_columns = set(expected.names) - set(found.names) - set(_partition_keys(fragment))
        if partition_columns:
            raise StagingError(
                f"File {fragment.path} lacks column(s) {sorted(partition_columns)} that the first file has: "
                "the input files' schemas disagree."
            )


def _partition_keys(fragment: ds.Fragment) -> list[str]:
    """Names of the hive partition columns a fragment's path provides (``country=DE/`` → ``country``)."""
    expression = fragment.partition_expression
    return [] if expression is None else list(ds.get_partition_keys(expression))
