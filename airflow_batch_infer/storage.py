"""Locations on local disk or object storage (``s3://``), through Airflow's ``ObjectStoragePath``.

A location is a plain string, small enough for XCom: a local absolute path, or a URL in the form
``ObjectStoragePath`` prints, which carries the Airflow connection in its netloc
(``s3://aws_conn@bucket/key``). Every task that receives such a string therefore reaches the same
store with the same connection, without a second parameter. Local paths stay plain paths, read and
written with the standard library, so the embedded default needs no fsspec.

Writes are atomic on both kinds of store: a local file is written to a temporary sibling and renamed; an
object is uploaded from a local temporary file in one PUT (or one multipart upload), which S3 makes
visible only once complete.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem
    from pyarrow.fs import FileSystem as ArrowFileSystem

# Read-ahead when streaming an object: a Parquet reader holds about one row group plus one block.
READ_BLOCK_SIZE = 1024 * 1024
_TEMP_PREFIX = "batch-infer-"


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` is a URL of an object store (``s3://...``) rather than a local path."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def location(path: str | Path, conn_id: str | None = None) -> str:
    """The canonical string of ``path``: an absolute local path, or a URL carrying ``conn_id``.

    :param path: a local path, ``file://`` URL, or object store URL (which may already name a connection).
    :param conn_id: the Airflow connection to reach an object store with (ignored for local paths).
    """
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not is_remote(text):
        return str(Path(text).expanduser().absolute())
    from airflow.sdk import ObjectStoragePath

    return str(ObjectStoragePath(text, conn_id=conn_id) if conn_id else ObjectStoragePath(text))


def join(base: str | Path, *parts: str) -> str:
    """``base`` with ``parts`` appended, as a location string."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base).joinpath(*parts))


def filesystem(path: str | Path) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``path`` and the path as that filesystem names it (``bucket/key``)."""
    if not is_remote(path):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), str(Path(path).absolute())
    from airflow.sdk import ObjectStoragePath

    target = ObjectStoragePath(str(path))
    return target.fs, target.path


def plain_url(path: str | Path) -> str:
    """``path`` without the connection id: the URL other systems (Redshift, Athena, DuckDB) understand."""
    if not is_remote(path):
        return str(Path(path).absolute())
    fs, fs_path = filesystem(path)
    return f"{protocol(fs)}://{fs_path}"


def protocol(fs: AbstractFileSystem) -> str:
    """The main protocol name of a filesystem (``s3`` for s3fs, which also answers to ``s3a``)."""
    return fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol


def same_store(a: str | Path, b: str | Path) -> bool:
    """Whether two locations are reached through the same filesystem (so a server-side copy works)."""
    if is_remote(a) != is_remote(b):
        return False
    if not is_remote(a):
        return True
    return filesystem(a)[0] is filesystem(b)[0]


def arrow_filesystem(fs: AbstractFileSystem) -> ArrowFileSystem:
    """A pyarrow filesystem that goes through ``fs`` (for datasets on object storage).

    Files are opened without read-ahead: the Parquet reader asks for the byte ranges it needs (footers,
    the pages of the columns it reads, coalesced), and each becomes one ranged GET, so a column subset
    does not download whole files.
    """
    from pyarrow import PythonFile
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    class _RangeReads(FSSpecHandler):
        def open_input_file(self, path: str) -> PythonFile:
            if not self.fs.isfile(path):
                raise FileNotFoundError(path)
            return PythonFile(self.fs.open(path, mode="rb", cache_type="none"), mode="r")

    return PyFileSystem(_RangeReads(fs))


def exists(path: str | Path) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    fs, fs_path = filesystem(path)
    return fs.exists(fs_path)


def is_file(path: str | Path) -> bool:
    if not is_remote(path):
        return Path(path).is_file()
    fs, fs_path = filesystem(path)
    return bool(fs.isfile(fs_path))


def size(path: str | Path) -> int:
    if not is_remote(path):
        return Path(path).stat().st_size
    fs, fs_path = filesystem(path)
    return int(fs.size(fs_path))


def pin(path: str | Path) -> dict[str, Any]:
    """What identifies this version of a file: its ``size`` and ``version``.

    The version is the modification time in nanoseconds for a local file; for an object, its version id
    where the bucket keeps versions, else its ETag. A file rewritten in place gets another pin.
    """
    if not is_remote(path):
        stat = Path(path).stat()
        return {"size": stat.st_size, "version": str(stat.st_mtime_ns)}
    fs, fs_path = filesystem(path)
    fs.invalidate_cache(fs_path)
    info = fs.info(fs_path)
    version = info.get("VersionId") or info.get("ETag") or info.get("LastModified") or ""
    return {"size": int(info["size"]), "version": str(version).strip('"')}


def open_input(path: str | Path) -> IO[bytes]:
    """Open a file for reading; objects are read in blocks (random access for Parquet footers)."""
    if not is_remote(path):
        return open(path, "rb")
    fs, fs_path = filesystem(path)
    return fs.open(fs_path, "rb", block_size=READ_BLOCK_SIZE, cache_type="readahead")


def read_text(path: str | Path) -> str:
    if not is_remote(path):
        return Path(path).read_text()
    with open_input(path) as handle:
        return handle.read().decode()


def list_files(path: str | Path) -> list[str]:
    """Every file below ``path`` (recursively), as location strings, sorted; empty when it does not exist."""
    if not is_remote(path):
        root = Path(path)
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    fs, fs_path = filesystem(path)
    fs.invalidate_cache(fs_path)
    if not fs.exists(fs_path):
        return []
    prefix = str(path).rstrip("/")
    return sorted(prefix + "/" + name[len(fs_path.rstrip("/")) + 1 :] for name in fs.find(fs_path))


def list_folders(path: str | Path) -> list[str]:
    """The folders directly below ``path``, as location strings, sorted; empty when it does not exist."""
    if not is_remote(path):
        root = Path(path)
        return sorted(str(p) for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    fs, fs_path = filesystem(path)
    fs.invalidate_cache(fs_path)
    if not fs.exists(fs_path):
        return []
    prefix = str(path).rstrip("/")
    entries = fs.ls(fs_path, detail=True)
    return sorted(
        prefix + "/" + posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory"
    )


def remove(path: str | Path) -> None:
    """Delete a file, or a folder with everything below it; nothing happens when it does not exist."""
    if not is_remote(path):
        target = Path(path)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        return
    fs, fs_path = filesystem(path)
    fs.invalidate_cache(fs_path)
    if fs.exists(fs_path):
        fs.rm(fs_path, recursive=True)


def local_temp(final: str | Path) -> Path:
    """A local file to write before :func:`publish` puts it at ``final``.

    Next to ``final`` for a local target (so that the rename is atomic), in the system's temporary folder
    for an object store.
    """
    if not is_remote(final):
        target = Path(final)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    name = posixpath.basename(str(final).rstrip("/"))
    return Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX)) / name


def remove_stale_temps(final: str | Path) -> list[Path]:
    """Delete temporary files an earlier, killed attempt left next to a local ``final`` (see
    :func:`local_temp`); object store targets write their temporary files elsewhere. Returns them."""
    if is_remote(final):
        return []
    target = Path(final)
    stale = list(target.parent.glob(f".{target.name}.*.tmp")) if target.parent.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def publish(local_file: str | Path, final: str | Path) -> None:
    """Move a complete local file to ``final`` in one atomic step (rename, or a single upload).

    The local file is gone afterwards, also when the upload fails.
    """
    local_file = Path(local_file)
    if not is_remote(final):
        os.replace(local_file, final)
        return
    try:
        fs, fs_path = filesystem(final)
        fs.put_file(str(local_file), fs_path)
        fs.invalidate_cache(posixpath.dirname(fs_path))
    finally:
        discard(local_file)


def discard(local_file: str | Path) -> None:
    """Delete a temporary file from :func:`local_temp` (and its temporary folder) after a failure."""
    local_file = Path(local_file)
    local_file.unlink(missing_ok=True)
    if local_file.parent.name.startswith(_TEMP_PREFIX):
        shutil.rmtree(local_file.parent, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a whole (small) file atomically."""
    tmp = local_temp(path)
    tmp.write_bytes(data)
    publish(tmp, path)


def copy(source: str | Path, target: str | Path) -> None:
    """Copy one file: server-side within one object store, a hard link on one local filesystem, else
    streamed through a local temporary file.

    A link costs nothing per byte, and is safe for the files copied here (a run's parts): they are never
    changed in place; a rewrite is a new file renamed over the old name, which leaves the link's content.
    """
    if is_remote(source) and same_store(source, target):
        fs, src = filesystem(source)
        _, dst = filesystem(target)
        fs.copy(src, dst)
        fs.invalidate_cache(posixpath.dirname(dst))
        return
    tmp = local_temp(target)
    if not is_remote(source) and not is_remote(target):
        try:
            os.link(source, tmp)
        except OSError:  # another filesystem, or one without hard links: copy the bytes
            pass
        else:
            publish(tmp, target)
            return
    with open_input(source) as reader, open(tmp, "wb") as writer:
        shutil.copyfileobj(reader, writer, 8 * 1024 * 1024)
    publish(tmp, target)


@contextmanager
def as_local_file(path: str | Path) -> Iterator[Path]:
    """A local file with the content of ``path`` (the file itself when local; a temporary copy else)."""
    if not is_remote(path):
        yield Path(path)
        return
    folder = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
    try:
        local = folder / posixpath.basename(str(path))
        with open_input(path) as reader, open(local, "wb") as writer:
            shutil.copyfileobj(reader, writer, 8 * 1024 * 1024)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def duckdb_readable(con: Any, paths: Sequence[str | Path]) -> list[str]:
    """Names a DuckDB connection can open for ``paths``: local paths, or plain URLs of a filesystem that
    this registers on ``con`` (DuckDB cannot install its own ``httpfs`` everywhere)."""
    names = []
    for path in paths:
        if is_remote(path):
            fs, _ = filesystem(path)
            if not con.filesystem_is_registered(protocol(fs)):
                con.register_filesystem(fs)
            names.append(plain_url(path))
        else:
            names.append(str(path))
    return names
