"""Staging: one snapshot of the input per run, pinned by a manifest, and the run's folder layout.

A run's folder (a local folder, or a prefix on object storage such as ``s3://bucket/staging/...``) holds::

    manifest.json              written last: its presence means the snapshot is complete
    chunks/chunk-00000.parquet the input rows with a row id, only for a copied snapshot (see below)
    outputs/part-00000.parquet one per chunk, written by the infer task
    rejects/part-00000.parquet rows set aside, with a reason
    summary.json               written by the persist task: what was committed where

A snapshot is taken one of two ways (``snapshot=``):

- ``"reference"`` (the default for Parquet files): nothing is copied. The manifest pins every input file
  (path, size, modification time or object version) and each chunk is a list of row-group ranges of
  those files; stage reads only the files' footers (:mod:`airflow_batch_infer.pinned_staging`). The infer
  task reads its row groups straight from the source and fails its chunk if a pinned file changed.
- ``"copy"``: the rows are copied into chunk files (:mod:`airflow_batch_infer.copy_staging`): for SQL
  queries, whose rows exist nowhere else, and for files that the ETL rewrites in place.

Local run folders are named by :class:`~pathlib.Path`; folders on object storage by location strings that
carry the Airflow connection (see :mod:`airflow_batch_infer.storage`). Every file is written atomically:
into a local temporary file first, then renamed (local) or uploaded in one PUT (object storage).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_batch_infer import storage
from airflow_batch_infer.errors import StagingError

if TYPE_CHECKING:
    import pyarrow.compute as pc

    from airflow_batch_infer.sources.base import Source

MANIFEST = "manifest.json"
SUMMARY = "summary.json"  # written by the persist task once the partition is committed
DEFAULT_ROW_ID_COLUMN = "row_id"
DEFAULT_MAX_CHUNKS = 1024  # Airflow's [core] max_map_length default
SNAPSHOTS = ("reference", "copy")
_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")

# A file of the run: a Path when local, a location string (``s3://conn@bucket/key``) on object storage.
RunPath = Path | str


@dataclass(frozen=True)
class ChunkDescriptor:
    """What a mapped infer task gets through XCom: where its chunk is, never the rows.

    :param run_dir: the run's staging folder (a local path or an object store location).
    :param index: chunk number, from 0.
    :param path: the chunk's Parquet file.
    :param rows: rows in the chunk.
    :param bytes: size of the chunk file.
    :param first_row: row id of the chunk's first row when ids are generated (else -1).
    :param slices: for a snapshot by reference, the row groups the chunk reads: one
        ``{"file": i, "row_groups": [start, stop], "first_row": n}`` per run of row groups of the
        manifest's ``files[i]`` (``path`` is then empty); empty for a chunk file.
    """

    run_dir: str
    index: int
    path: str
    rows: int
    bytes: int
    first_row: int = -1
    slices: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkDescriptor:
        return cls(**data)


@dataclass
class Manifest:
    """The snapshot's description, stored as ``manifest.json`` in the run folder.

    :param run_dir: the run's staging folder.
    :param source: where the rows came from.
    :param row_id_column: column that identifies each row in outputs and rejects.
    :param total_rows: rows staged.
    :param chunk_rows: rows per chunk (the last may hold fewer).
    :param schema: column name → Arrow type, as text.
    :param chunks: one descriptor per chunk.
    :param snapshot: ``copy`` (chunk files) or ``reference`` (row groups of the pinned ``files``).
    :param files: for a snapshot by reference, each input file as pinned: ``path`` (a location),
        ``size``, ``version`` (modification time in ns, or the object's version id or ETag), ``rows``,
        ``row_groups`` (rows of each), ``first_row`` (the generated id of its first row) and
        ``partition`` (hive partition column → value from its folder names).
    :param generated_ids: whether ``row_id_column`` was added by staging (ids 0, 1, 2... in file order).
    :param dag_id: the DAG of the run that took the snapshot (for retention; empty when not staged by a run).
    :param run_id: that run's id.
    :param partition: the partition it replaces.
    :param row_filter: the ``filter=`` applied (:class:`~airflow_batch_infer.row_filter.RowFilter` as a
        dict), or ``None``.
    :param filtered_rows: rows the filter removed at stage: all of them for a copy; for a snapshot by
        reference, those of row groups pruned by their statistics (the rest are filtered as the infer
        tasks read, and counted in their results).
    :param stage_seconds: wall time of the snapshot (for the run report).
    """

    run_dir: str
    source: str
    row_id_column: str
    total_rows: int
    chunk_rows: int
    schema: dict[str, str]
    chunks: list[ChunkDescriptor] = field(default_factory=list)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    snapshot: str = "copy"
    files: list[dict[str, Any]] = field(default_factory=list)
    generated_ids: bool = True
    dag_id: str = ""
    run_id: str = ""
    partition: str = ""
    row_filter: dict[str, Any] | None = None
    filtered_rows: int = 0
    stage_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        # Shallow: a deep copy of the pinned files' row-group lists cost more than reading their footers.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["chunks"] = [c.to_dict() for c in self.chunks]
        return data

    @classmethod
    def load(cls, run_dir: str | Path) -> Manifest:
        path = run_file(run_dir, MANIFEST)
        if not storage.exists(path):
            raise StagingError(f"No manifest at {path}: the stage task has not completed for this run.")
        data = json.loads(storage.read_text(path))
        data["chunks"] = [ChunkDescriptor.from_dict(c) for c in data["chunks"]]
        return cls(**data)


def safe_name(text: str) -> str:
    """A folder name made of ``text`` (a run id, a partition key) with unsafe characters replaced."""
    cleaned = _SAFE.sub("_", text).strip("._")
    return cleaned or "_"


def run_file(run_dir: str | Path, *parts: str) -> RunPath:
    """A file of the run folder: a :class:`Path` when local, a location string on object storage."""
    if storage.is_remote(run_dir):
        return storage.join(run_dir, *parts)
    return Path(run_dir).joinpath(*parts)


def run_directory(staging_root: str | Path, dag_id: str, partition: str, run_id: str) -> RunPath:
    """The folder of one run: ``<staging_root>/<dag_id>/<partition>/<run_id>-<hash>``.

    The run id is made safe for a path and followed by 8 hex digits of its SHA-256, so that two run ids
    that read the same once made safe (``manual__12:00`` and ``manual__12_00``) never share a folder.

    :param staging_root: a local folder, or an object store location (``s3://conn@bucket/prefix``).
    """
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return run_file(staging_root, safe_name(dag_id), safe_name(partition), f"{safe_name(run_id)}-{digest}")


def output_part_path(run_dir: str | Path, index: int) -> RunPath:
    """Where the infer task writes the outputs of chunk ``index``."""
    return run_file(run_dir, "outputs", f"part-{index:05d}.parquet")


def rejects_part_path(run_dir: str | Path, index: int) -> RunPath:
    """Where the infer task writes the rows of chunk ``index`` that it set aside."""
    return run_file(run_dir, "rejects", f"part-{index:05d}.parquet")


def check_inside(path: str | Path, root: str | Path) -> RunPath:
    """Return ``path`` normalised, refusing any path outside ``root`` (a chunk from another run, say)."""
    if storage.is_remote(path) or storage.is_remote(root):
        scheme, _, rest = str(path).partition("://")
        base_scheme, _, base_rest = str(root).partition("://")
        resolved, base = posixpath.normpath(rest), posixpath.normpath(base_rest)
        if scheme != base_scheme or not (resolved + "/").startswith(base.rstrip("/") + "/"):
            raise StagingError(f"Path {path} is outside the staging folder {root}; refusing to use it.")
        return f"{scheme}://{resolved}"
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        raise StagingError(f"Path {resolved} is outside the staging folder {base}; refusing to use it.")
    return resolved


def atomic_target(final: str | Path) -> Path:
    """A local temporary file to write ``final`` into; :func:`commit` then moves it in place.

    For a local ``final`` it is a sibling (so ``os.replace`` works as well as :func:`commit`); for an
    object store location it is a file in the system's temporary folder.
    """
    return storage.local_temp(final)


def commit(tmp: str | Path, final: str | Path) -> None:
    """Put the complete file ``tmp`` (from :func:`atomic_target`) at ``final`` in one atomic step."""
    storage.publish(tmp, final)


def write_json_atomically(path: str | Path, data: dict[str, Any]) -> None:
    storage.write_bytes(path, json.dumps(data, indent=2).encode())


def check_columns(
    names: Sequence[str], columns: Sequence[str] | None, row_id_column: str | None, source: str
) -> None:
    """Refuse columns (or a row id column) the input lacks, and a ``row_id`` column that would clash."""
    if columns:
        missing = [c for c in columns if c not in names]
        if missing:
            raise StagingError(
                f"Column(s) {missing} are not in the input {source}; columns present: {list(names)}."
            )
    if row_id_column and row_id_column not in names:
        raise StagingError(
            f"Row id column {row_id_column!r} is not in the input; columns present: {list(names)}."
        )
    keep = list(columns) if columns else list(names)
    if row_id_column is None and DEFAULT_ROW_ID_COLUMN in keep:
        raise StagingError(
            f"The input already has a column {DEFAULT_ROW_ID_COLUMN!r}: pass "
            f"row_id_column={DEFAULT_ROW_ID_COLUMN!r} to use it as the row id, or leave it out of the "
            "columns staged."
        )


def check_unique_ids(paths: Sequence[str], column: str) -> None:
    """Refuse a row id column that has nulls or duplicates: outputs join back to inputs by it.

    DuckDB counts over the files, reading that column only and spilling to disk, so memory stays
    bounded however many rows there are.

    :param paths: the staged chunk files, or the pinned input files.
    :param column: the row id column.
    """
    import duckdb  # here: the DAG's parse in every task process imports this module

    quoted = '"' + column.replace('"', '""') + '"'
    with (
        tempfile.TemporaryDirectory(prefix="abi-duckdb-") as spill,  # private: no shared fixed /tmp path
        duckdb.connect(config={"memory_limit": "256MB", "temp_directory": spill}) as con,
    ):
        files = {"files": storage.duckdb_readable(con, paths)}
        nulls = con.execute(
            f"SELECT count(*) FROM read_parquet($files) WHERE {quoted} IS NULL", files
        ).fetchone()
        if nulls[0]:
            raise StagingError(f"Row id column {column!r} has {nulls[0]:,} null(s): every row needs an id.")
        repeated = con.execute(
            f"SELECT {quoted}, count(*) AS n FROM read_parquet($files) GROUP BY 1 HAVING n > 1 "
            "ORDER BY n DESC, 1 LIMIT 5",
            files,
        ).fetchall()
    if repeated:
        shown = ", ".join(f"{value!r} ({count} times)" for value, count in repeated)
        raise StagingError(
            f"Row id column {column!r} is not unique: {shown}. Outputs join back to inputs by the row id: "
            "deduplicate the input, or leave row_id_column unset to number the rows."
        )


def stage_source(
    source: Source,
    run_dir: str | Path,
    *,
    chunk_rows: int | str = 250_000,
    columns: Sequence[str] | None = None,
    row_id_column: str | None = None,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
    snapshot: str = "reference",
    parallel_tasks: int = 1,
    run: Mapping[str, str] | None = None,
    row_filter: str | pc.Expression | None = None,
) -> Manifest:
    """Snapshot ``source`` and write the manifest last; staging the same run again replaces the snapshot.

    Parquet files are pinned by reference (``snapshot="reference"``,
    :mod:`~airflow_batch_infer.pinned_staging`): only their footers are read. Otherwise
    (``snapshot="copy"``, or a SQL query, whose rows exist nowhere else) the rows are copied into chunk
    files (:mod:`~airflow_batch_infer.copy_staging`).

    :param source: where the rows come from (:mod:`airflow_batch_infer.sources`).
    :param run_dir: the run's staging folder (see :func:`run_directory`), local or on object storage.
    :param chunk_rows: rows per chunk, or ``"auto"`` (see :func:`plan_chunk_rows`); raised if the input
        would need more than ``max_chunks`` chunks. Chunks by reference end at row-group boundaries, so
        they hold whole row groups: about ``chunk_rows`` rows each.
    :param columns: columns to keep (all when ``None``); the row id column is always kept.
    :param row_id_column: the input's own unique row id column; when ``None`` a ``row_id`` column of
        int64 ids is added: 0, 1, 2... in the order of the manifest's files and their rows (a pinned
        file's first id plus the row's offset in the file).
    :param max_chunks: upper bound on the chunk count (Airflow's ``max_map_length``).
    :param snapshot: ``"reference"`` (pin Parquet files, copy nothing) or ``"copy"``.
    :param parallel_tasks: infer tasks that can run at once, for ``chunk_rows="auto"``.
    :param run: ``dag_id``, ``run_id`` and ``partition`` of the run, recorded in the manifest (retention
        asks Airflow for the run's state by them).
    :param row_filter: for a Parquet source, the rows to score: a pyarrow dataset expression or a SQL-like
        string (:mod:`~airflow_batch_infer.row_filter`); generated row ids stay those of the source rows.
    """
    if snapshot not in SNAPSHOTS:
        raise StagingError(f"snapshot must be one of {list(SNAPSHOTS)}, got {snapshot!r}.")
    started, known = time.monotonic(), source.schema()
    if known is not None:
        check_columns(known.names, columns, row_id_column, source.description)
    keep = list(columns) if columns else None
    if keep is not None and row_id_column and row_id_column not in keep:
        keep.insert(0, row_id_column)
    from airflow_batch_infer.sources.parquet import ParquetSource
    from airflow_batch_infer.staging_request import StagingRequest

    parsed = None
    if isinstance(row_filter, str) and row_filter.strip() in ("", "None"):  # a template rendered empty
        row_filter = None
    if row_filter is not None:
        if not isinstance(getattr(source, "source", source), ParquetSource):  # a LimitedSource reads one
            raise StagingError(
                "filter= is for Parquet sources; for a SQL query, put the condition in its WHERE clause."
            )
        from airflow_batch_infer.row_filter import parse_filter

        parsed = parse_filter(row_filter, source.schema())
    request = StagingRequest(
        run_dir, chunk_rows, max_chunks, parallel_tasks, columns, keep, row_id_column, parsed
    )
    storage.remove(run_dir)
    if snapshot == "reference" and isinstance(source, ParquetSource):
        from airflow_batch_infer.pinned_staging import pin_files

        manifest = pin_files(source, request)
    else:
        from airflow_batch_infer.copy_staging import copy_rows

        manifest = copy_rows(source, request)
    if run:
        manifest.dag_id, manifest.run_id = str(run["dag_id"]), str(run["run_id"])
        manifest.partition = str(run.get("partition", ""))
    manifest.stage_seconds = round(time.monotonic() - started, 3)
    write_json_atomically(run_file(run_dir, MANIFEST), manifest.to_dict())
    return manifest


def stage_parquet(
    source: str | Path | Sequence[str | Path],
    run_dir: str | Path,
    *,
    chunk_rows: int | str = 250_000,
    columns: Sequence[str] | None = None,
    row_id_column: str | None = None,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
    conn_id: str | None = None,
    snapshot: str = "reference",
    parallel_tasks: int = 1,
    run: Mapping[str, str] | None = None,
    row_filter: str | pc.Expression | None = None,
) -> Manifest:
    """Snapshot Parquet input and write the manifest last (see :func:`stage_source`).

    :param source: a Parquet file, a folder of them (hive partitions understood), or a list of paths;
        local or on object storage (``s3://bucket/key``).
    :param run_dir: the run's staging folder (see :func:`run_directory`).
    :param chunk_rows: rows per chunk, or ``"auto"``; raised if the input would need more than
        ``max_chunks`` chunks.
    :param columns: columns to keep (all when ``None``): only these are read from the files.
    :param row_id_column: the input's own unique row id column; when ``None`` a ``row_id`` column of
        sequential int64 ids is added.
    :param max_chunks: upper bound on the chunk count (Airflow's ``max_map_length``).
    :param conn_id: Airflow connection (``aws``) for a source on object storage.
    :param snapshot: ``"reference"`` (pin the files, copy nothing) or ``"copy"`` (chunk files).
    :param parallel_tasks: infer tasks that can run at once, for ``chunk_rows="auto"``.
    :param run: ``dag_id``, ``run_id`` and ``partition`` of the run, recorded in the manifest.
    :param row_filter: the rows to score (a pyarrow dataset expression or a SQL-like string).
    """
    from airflow_batch_infer.sources.parquet import ParquetSource

    return stage_source(
        ParquetSource(source, conn_id=conn_id),
        run_dir,
        chunk_rows=chunk_rows,
        columns=columns,
        row_id_column=row_id_column,
        max_chunks=max_chunks,
        snapshot=snapshot,
        parallel_tasks=parallel_tasks,
        run=run,
        row_filter=row_filter,
    )
