"""Allowlists for what a run may read and write: locations under allowed roots, allowed connections.

A manual run's Params can point ``input_path``, ``staging_root`` or ``sink_options`` anywhere a template
lets them. With ``allowed_roots`` and ``allowed_conn_ids`` (arguments of ``batch_inference`` and of the
stage and persist operators), every location a run uses must lie under one of the roots and every
connection it names must be in the list; the stage task checks them all, the sink's included, before it
stages anything, and persist checks the sink again. A refusal is an :class:`NotAllowedError`
(``AirflowFailException``): no retry can fix it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from airflow.sdk.exceptions import AirflowFailException

from airflow_batch_infer import storage

# The sink options that name a location (local path or URL), by sink; every "*conn_id" option is a connection.
SINK_LOCATIONS: dict[str, tuple[str, ...]] = {
    "duckdb": ("database",),
    "s3_parquet": ("path",),
    "athena": ("location", "output_location"),
    "redshift": ("s3_prefix",),
    "postgres": (),
    "iceberg": ("warehouse",),
}
# Sink options that say where and how to connect inline, past both allowlists (an Iceberg catalog's uri,
# warehouse and credentials): refused when either allowlist is in force; a connection says it instead.
SINK_INLINE_ENDPOINTS: dict[str, tuple[str, ...]] = {"iceberg": ("catalog",)}


class NotAllowedError(AirflowFailException):
    """A run points at a location or a connection its DAG does not allow."""


def check_location(location: str | Path, roots: Sequence[str] | None, what: str) -> None:
    """Refuse ``location`` unless it lies under one of ``roots`` (no check when ``roots`` is ``None``).

    Local paths are compared resolved (``..`` and links followed); URLs without their connection id, by
    whole path segments (``s3://bucket/data`` does not admit ``s3://bucket/database``).

    :param location: a local path or a URL (``s3://conn@bucket/key``).
    :param roots: the allowed roots.
    :param what: what the location is, for the message (``source``, ``sink_options.path``).
    """
    if roots is None:
        return
    if not any(_under(location, root) for root in roots):
        raise NotAllowedError(
            f"{what} {_plain(location) if storage.is_remote(location) else location} is not under "
            f"any of the allowed roots {list(roots)}: the DAG's allowed_roots does not admit it. Point it "
            "inside one of them, or ask the DAG's author to allow it."
        )


def check_conn_id(conn_id: str | None, allowed: Sequence[str] | None, what: str) -> None:
    """Refuse a connection id that is not in ``allowed`` (no check when either is ``None``).

    :param conn_id: the connection a run names.
    :param allowed: the allowed connection ids.
    :param what: where it is named, for the message.
    """
    if allowed is None or conn_id in (None, ""):
        return
    if conn_id not in allowed:
        raise NotAllowedError(
            f"{what} names connection {conn_id!r}, which the DAG's allowed_conn_ids {list(allowed)} does not "
            "admit."
        )


def check_locations(
    locations: Iterable[tuple[str, str | Path | None]],
    roots: Sequence[str] | None,
    conn_ids: Sequence[str] | None,
) -> None:
    """Check each ``(what, location)``: under a root, and the connection its URL carries allowed."""
    for what, location in locations:
        if location in (None, ""):
            continue
        check_location(location, roots, what)
        if storage.is_remote(location):
            check_conn_id(conn_id_of(location), conn_ids, what)


def check_sink(
    sink: str, options: Mapping[str, Any], roots: Sequence[str] | None, conn_ids: Sequence[str] | None
) -> None:
    """Check a sink's options: its connections and the locations it writes to.

    :param sink: the sink's name (``duckdb``, ``postgres``, ...).
    :param options: its options, rendered.
    :param roots: the allowed roots.
    :param conn_ids: the allowed connection ids.
    """
    for key, value in options.items():
        if key.endswith("conn_id"):
            check_conn_id(value, conn_ids, f"sink_options.{key}")
    for key in SINK_INLINE_ENDPOINTS.get(sink, ()):
        if options.get(key) and (roots is not None or conn_ids is not None):
            raise NotAllowedError(
                f"sink_options.{key} configures the {sink} sink's endpoint inline, which the DAG's "
                "allowlists cannot check: name a connection instead (catalog_conn_id), which "
                "allowed_conn_ids governs."
            )
    check_locations(
        ((f"sink_options.{key}", options.get(key)) for key in SINK_LOCATIONS.get(sink, ())), roots, conn_ids
    )


def conn_id_of(location: str | Path) -> str | None:
    """The Airflow connection a URL carries (``s3://conn@bucket/key`` → ``conn``); ``None`` for none."""
    netloc = urlsplit(str(location)).netloc
    return netloc.rpartition("@")[0] or None if "@" in netloc else None


def _plain(location: str | Path) -> str:
    """A URL without the connection id in its netloc (read as text: the connection need not exist)."""
    parts = urlsplit(str(location))
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _under(location: str | Path, root: str) -> bool:
    if storage.is_remote(location) != storage.is_remote(root):
        return False
    if not storage.is_remote(location):
        return Path(location).resolve().is_relative_to(Path(root).resolve())
    scheme, _, rest = _plain(location).partition("://")
    base_scheme, _, base_rest = _plain(root).partition("://")
    rest, base_rest = posixpath.normpath(rest), posixpath.normpath(base_rest)
    return scheme == base_scheme and (rest == base_rest or rest.startswith(base_rest.rstrip("/") + "/"))
