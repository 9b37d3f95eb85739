"""A site's own sinks and runtimes: found by ``"module:Class"`` path or by entry point name, no fork needed.

A name is looked up, in order, among the built-in ones, as a class path (it holds a ``:``), then among the
installed distributions' entry points of the kind's group (:data:`SINK_GROUP`, :data:`RUNTIME_GROUP`)::

    [project.entry-points."airflow_batch_infer.sinks"]
    bigquery = "my_pkg.sinks:BigQuerySink"
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points

from airflow.sdk.exceptions import AirflowFailException

SINK_GROUP = "airflow_batch_infer.sinks"
RUNTIME_GROUP = "airflow_batch_infer.runtimes"


class PluginNotFoundError(ValueError, AirflowFailException):
    """No built-in, class path or entry point of that name: a retry cannot fix it; the task fails at once."""


def plugin_entry_points(group: str) -> dict[str, EntryPoint]:
    """The installed entry points of ``group``, by name (the first one wins where two share a name).

    :param group: the entry point group.
    """
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=group):
        found.setdefault(entry.name, entry)
    return found


def import_class_path(path: str, kind: str) -> type:
    """The class that ``"module:Class"`` (or ``"module:Outer.Inner"``) names.

    :param path: the class path.
    :param kind: what it should be, for the messages (``sink``, ``Triton runtime``).
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise PluginNotFoundError(f"The {kind} class path {path!r} must look like 'my_pkg.module:ClassName'.")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginNotFoundError(
            f"Cannot import module {module_name!r} of the {kind} {path!r}: {exc}. Install the package that "
            "provides it on every worker (and the DAG processor)."
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise PluginNotFoundError(
                f"Module {module_name!r} has no {attribute!r}, named by the {kind} {path!r}."
            ) from None
    if not isinstance(target, type):
        raise PluginNotFoundError(f"The {kind} {path!r} is a {type(target).__name__}, not a class.")
    return target


def resolve_plugin(name: str, builtin: Mapping[str, str], group: str, kind: str, base: type) -> type:
    """The class that ``name`` stands for: a built-in, a ``"module:Class"`` path, or an entry point.

    :param name: what the DAG said (``duckdb``, ``my_pkg.sinks:BigQuerySink``, ``bigquery``).
    :param builtin: built-in name → ``"module:Class"``.
    :param group: the entry point group searched for other names.
    :param kind: what it is, for the messages.
    :param base: the class it must derive from.
    """
    if not isinstance(name, str) or not name.strip():
        raise PluginNotFoundError(f"A {kind} name must be a non-empty string, got {name!r}.")
    if name in builtin:
        return import_class_path(builtin[name], kind)
    if ":" in name:
        found = import_class_path(name, kind)
    else:
        entries = plugin_entry_points(group)
        if name not in entries:
            raise PluginNotFoundError(
                f"Unknown {kind} {name!r}. Built in: {', '.join(map(repr, builtin))}; installed entry points "
                f"({group}): {', '.join(map(repr, entries)) or 'none'}. A class of your own: give "
                "'my_pkg.module:ClassName', or register it under that entry point group."
            )
        try:
            found = entries[name].load()
        except (ImportError, AttributeError) as exc:
            raise PluginNotFoundError(
                f"The {kind} entry point {name!r} ({entries[name].value}) cannot be loaded: {exc}."
            ) from exc
    if not (isinstance(found, type) and issubclass(found, base)):
        raise PluginNotFoundError(
            f"The {kind} {name!r} is {found!r}, not a subclass of {base.__module__}.{base.__qualname__}."
        )
    return found
