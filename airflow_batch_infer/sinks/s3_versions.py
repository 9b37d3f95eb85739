"""Versions and the commit pointer of the ``s3_parquet`` dataset; the readers of its committed partitions.

Each run writes a partition's parts into a new version folder, ``<partition folder>/_v<UTC time>-<token>/``,
of the output table and of the rejects table. One object, the output table's
``<table>/<partition_column>=<key>/_SUCCESS``, is the commit of both: it names the version and lists its
files and rows for the outputs and, under ``rejects``, for the rejects table, whose partition folders hold
no marker of their own. It is replaced in one conditional write (S3 ``If-Match`` on the ETag read when
the run took the partition's lock, ``If-None-Match: *`` for the first commit; on local disk a compare of
its content and an atomic rename, under an exclusive ``flock`` of the folder), so a reader sees the
previous version or the new one for both tables, and a writer whose lock was taken over cannot commit over
a newer commit.

Hive discovery (Spark, Athena, Trino, pyarrow, DuckDB globs) skips names that start with ``_``, so plain
discovery of the table folder finds no rows of a partition written this way: read the files the pointer
lists (:func:`committed_files`, :func:`read_partition`). Pointers of the earlier layout (``files`` directly
in the partition folder) are read the same way.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from airflow_batch_infer import storage
from airflow_batch_infer.sinks.base import REJECTS_SUFFIX

log = logging.getLogger(__name__)

POINTER = "_SUCCESS"
VERSION_PREFIX = "_v"
#: The pointer's layout: 2 is versioned (1, the earlier layout, had no ``format`` field).
POINTER_FORMAT = 2


class CommitConflictError(RuntimeError):
    """The partition's pointer changed since this run read it: another run committed in between."""


@dataclass(frozen=True)
class VersionFiles:
    """One table's share of a version.

    :param table: the table.
    :param rows: rows in its files.
    :param files: its files, relative to the table's partition folder (``_v.../part-00000.parquet``).
    """

    table: str
    rows: int
    files: tuple[str, ...]


def new_version() -> str:
    """A new version folder's name: UTC time (so that names sort by age) and a random token."""
    return f"{VERSION_PREFIX}{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:12]}"


def pointer_body(
    partition: str, partition_column: str, version: str, outputs: VersionFiles, rejects: VersionFiles
) -> bytes:
    """The pointer's JSON: the fields ``_SUCCESS`` always had (``rows``, ``files``, ``committed_at``) for
    the outputs, plus ``version`` and ``rejects``."""
    body = {
        "format": POINTER_FORMAT,
        "table": outputs.table,
        "partition": partition,
        "partition_column": partition_column,
        "version": version,
        "rows": outputs.rows,
        "files": list(outputs.files),
        "committed_at": datetime.now(timezone.utc).isoformat(),
        "rejects": {"table": rejects.table, "rows": rejects.rows, "files": list(rejects.files)},
    }
    return json.dumps(body, indent=2).encode()


def read_pointer(pointer: str) -> tuple[dict[str, Any] | None, str | None]:
    """The pointer's content and what identifies it for a conditional write (S3 ETag, or a hash of a local
    file); ``(None, None)`` when the partition has none."""
    if not storage.is_remote(pointer):
        data = _read_local(pointer)
        return (json.loads(data), _digest(data)) if data is not None else (None, None)
    fs, fs_path = storage.filesystem(pointer)
    fs.invalidate_cache(fs_path)
    try:
        etag = str(fs.info(fs_path)["ETag"])
        data = fs.cat_file(fs_path)
    except FileNotFoundError:
        return None, None
    return json.loads(data), etag


def write_pointer(pointer: str, body: bytes, expected: str | None) -> None:
    """Replace the pointer with ``body`` in one write, only if it is still the one ``expected`` identifies.

    :param pointer: the pointer's location.
    :param body: its new content.
    :param expected: what :func:`read_pointer` returned as its identity; ``None``: it must not exist.
    :raises CommitConflictError: when another writer replaced (or created) it in between.
    """
    conflict = CommitConflictError(
        f"The pointer {storage.plain_url(pointer)} changed since this run read it: another run committed "
        "the partition meanwhile, having taken this run's lock over as stale (set lock_timeout above the "
        "longest persist). Nothing of this run was made visible; run it again."
    )
    if not storage.is_remote(pointer):
        _write_local_if(Path(pointer), body, expected, conflict)
        return
    fs, fs_path = storage.filesystem(pointer)
    condition = {"IfMatch": expected} if expected else {}
    try:
        fs.pipe_file(fs_path, body, mode="overwrite" if expected else "create", **condition)
    except (FileExistsError, FileNotFoundError) as exc:
        raise conflict from exc
    except OSError as exc:
        if _precondition_failed(exc):
            raise conflict from exc
        raise
    finally:
        fs.invalidate_cache(fs_path)


def _precondition_failed(exc: BaseException) -> bool:
    """Whether S3 refused a conditional write: 412 Precondition Failed, or 409 for a concurrent one."""
    for error in (exc, exc.__cause__):
        code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
        if code in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
            return True
    text = str(exc)
    return "PreconditionFailed" in text or "pre-condition" in text or "412" in text


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_local(path: str | Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def _write_local_if(path: Path, body: bytes, expected: str | None, conflict: Exception) -> None:
    """Compare and swap a local file: under an exclusive lock of its folder, check, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        current = _read_local(path)
        if (None if current is None else _digest(current)) != expected:
            raise conflict
        storage.write_bytes(path, body)
    finally:
        os.close(folder)  # releases the flock


def remove_other_entries(folder: str, keep: Sequence[str]) -> None:
    """Delete everything directly below ``folder`` but the names in ``keep``: earlier versions, versions of
    runs that failed, files of the earlier layout. A failure is logged, never raised (the next run retries).
    """
    try:
        if storage.is_remote(folder):  # an object store has no folders: the first part of each key below
            start = len(folder.rstrip("/")) + 1
            children = {path[start:].split("/")[0] for path in storage.list_files(folder)}
        else:
            children = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        for child in sorted(children - set(keep)):
            storage.remove(storage.join(folder, child))
    except Exception:
        log.warning(
            "Could not remove the earlier versions below %s; the next run will.", folder, exc_info=True
        )


# --- readers --------------------------------------------------------------------------------------------


def committed_version(
    path: str,
    table: str,
    partition: str,
    partition_column: str = "batch_partition",
    conn_id: str | None = None,
) -> tuple[str | None, list[str]]:
    """The committed version of one partition of ``table`` and its files (location strings).

    ``table`` is the sink's table or its rejects table (``<table>_rejects``): both are read from the same
    pointer, so they are always of one version. The version is ``None`` for a partition of the earlier
    layout.

    :param path: the datasets' root, as given to the sink (``s3://bucket/lake`` or a local folder).
    :param table: the table's name (its folder under ``path``).
    :param partition: the partition key.
    :param partition_column: the partition folders' key.
    :param conn_id: the Airflow connection for ``path``.
    :raises FileNotFoundError: when the partition has no commit.
    """
    root = storage.location(path, conn_id)
    folder_name = f"{partition_column}={partition}"
    if table.endswith(REJECTS_SUFFIX):
        owner = read_pointer(storage.join(root, table[: -len(REJECTS_SUFFIX)], folder_name, POINTER))[0] or {}
        rejects = owner.get("rejects")
        if rejects and rejects.get("table") == table:
            folder = storage.join(root, table, folder_name)
            return owner["version"], [storage.join(folder, name) for name in rejects["files"]]
    pointer = storage.join(root, table, folder_name, POINTER)
    own, _ = read_pointer(pointer)
    if own is None:
        raise FileNotFoundError(
            f"Partition {folder_name} of {table} has no commit ({storage.plain_url(pointer)} is missing)."
        )
    folder = storage.join(root, table, folder_name)
    return own.get("version"), [storage.join(folder, name) for name in own["files"]]


def committed_files(
    path: str,
    table: str,
    partition: str,
    partition_column: str = "batch_partition",
    conn_id: str | None = None,
) -> list[str]:
    """The files of the committed version of one partition (see :func:`committed_version`).

    Other engines read exactly these: :func:`~airflow_batch_infer.storage.plain_url` gives their URLs, e.g.
    for DuckDB ``read_parquet([...], hive_partitioning = true)`` or Spark
    ``spark.read.option("basePath", "<path>/<table>").parquet(*urls)``, which take the partition column from
    the ``<partition_column>=<key>`` folder and ignore the ``_v...`` one.
    """
    return committed_version(path, table, partition, partition_column, conn_id)[1]


def read_partition(
    path: str,
    table: str,
    partition: str,
    partition_column: str = "batch_partition",
    conn_id: str | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """The rows of the committed version of one partition, with the partition column (a string).

    A reader that read the pointer just before a new version was committed can find the files of the
    previous one deleted: the pointer is then read again (three times at most).

    :param columns: the columns to read (all by default).
    """
    import pyarrow.dataset as ds

    table_folder = storage.join(storage.location(path, conn_id), table)
    fs, base = storage.filesystem(table_folder)
    hive = ds.partitioning(pa.schema([(partition_column, pa.string())]), flavor="hive")
    attempts = 3
    while True:
        version, files = committed_version(path, table, partition, partition_column, conn_id)
        try:
            dataset = ds.dataset(
                [storage.filesystem(f)[1] for f in files],
                filesystem=storage.arrow_filesystem(fs) if storage.is_remote(table_folder) else None,
                format="parquet",
                partitioning=hive,
                partition_base_dir=base,
            )
            return dataset.to_table(columns=list(columns) if columns is not None else None)
        except OSError:
            attempts -= 1
            moved = committed_version(path, table, partition, partition_column, conn_id)[0] != version
            if not attempts or not moved:
                raise
