"""A lock per (table, partition) on object storage or local disk, taken with a conditional write.

Two runs that persist the same partition at once (a manual rerun during the scheduled run, say) would
interleave their file copies and deletions. The first to create
``<table location>/_locks/<column>=<key>.lock`` holds the partition: the create is conditional (S3
``If-None-Match: *``, an exclusive create on disk), so the second writer fails at once with a message
naming the holder. Readers of hive datasets skip ``_locks`` (its
name starts with ``_``). A lock older than ``timeout`` is taken to be a dead writer's and taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator

from airflow_batch_infer import storage

log = logging.getLogger(__name__)

LOCKS = "_locks"
#: Seconds after which a lock is taken to be a dead writer's.
DEFAULT_LOCK_TIMEOUT = 3600.0


class PartitionLockedError(RuntimeError):
    """Another writer holds the partition; the message names it and says what to do."""


def lock_path(table_location: str, partition_column: str, partition: str) -> str:
    """Where the lock of one partition of the table at ``table_location`` lives."""
    return storage.join(table_location, LOCKS, f"{partition_column}={partition}.lock")


def _create(path: str, body: bytes) -> bool:
    """Create ``path`` with ``body`` only if it does not exist; ``False`` when it does."""
    fs, fs_path = storage.filesystem(path)
    if not storage.is_remote(path):
        os.makedirs(os.path.dirname(fs_path), exist_ok=True)
    try:
        fs.pipe_file(fs_path, body, mode="create")
    except FileExistsError:
        return False
    except OSError as exc:  # S3 answers 412 Precondition Failed to a conditional put on an existing key
        if "PreconditionFailed" in str(exc) or "412" in str(exc):
            return False
        raise
    fs.invalidate_cache(fs_path)
    return True


def _holder(path: str) -> dict:
    try:
        return json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def partition_lock(
    table_location: str,
    partition_column: str,
    partition: str,
    *,
    timeout: float = DEFAULT_LOCK_TIMEOUT,
    description: str = "",
) -> Iterator[str]:
    """Hold the partition's lock for the body of the ``with``; release it after, whatever happened.

    :param table_location: the table's folder (``s3://...`` or a local path).
    :param partition_column: the partition column.
    :param partition: the partition key.
    :param timeout: seconds after which a lock is taken to be a dead writer's and taken over.
    :param description: who takes it (a table name, a run), recorded in the lock.
    :raises PartitionLockedError: when another writer holds it.
    """
    path = lock_path(table_location, partition_column, partition)
    token = uuid.uuid4().hex
    body = json.dumps(
        {"token": token, "taken_at": time.time(), "host": socket.gethostname(), "by": description}
    ).encode()
    for attempt in (1, 2):
        if _create(path, body):
            break
        holder = _holder(path)
        age = time.time() - float(holder.get("taken_at") or 0)
        if attempt == 1 and holder and age > timeout:
            log.warning("Taking over the lock %s of a writer gone %.0f s ago: %s", path, age, holder)
            storage.remove(path)
            continue
        raise PartitionLockedError(
            f"Partition {partition_column}={partition} is being written by another run "
            f"({holder.get('by') or 'unknown'} on {holder.get('host') or '?'}, {age:.0f} s ago; lock "
            f"{storage.plain_url(path)}). Run again once it has finished; if that writer is dead, delete the "
            f"lock (it is taken over by itself after {timeout:.0f} s)."
        )
    try:
        yield path
    finally:
        if _holder(path).get("token") == token:
            storage.remove(path)
