"""OpenLineage datasets of a run: its input, its snapshot, the model and the two output tables.

The operators' ``get_openlineage_facets_on_complete`` call these; the OpenLineage provider (the
``openlineage`` extra) emits them. Without that provider nothing here is imported.

- stage: the input (Parquet files or folders, or the tables a SQL query reads, in its connection's
  namespace) → the snapshot (``manifest.json``), each with the staged schema and the row count.
- start: the model in its repository (name, versions) → nothing.
- infer: the snapshot's chunk and the served model (name, version, tensors) → the chunk's part files.
- persist: the run's parts → the output table and ``<table>_rejects``, with their schemas and rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from airflow_batch_infer import storage
from airflow_batch_infer.assets import TableLocation, file_dataset
from airflow_batch_infer.sinks.base import REJECTS_SUFFIX
from airflow_batch_infer.staging import MANIFEST, Manifest, run_file


def _schema_facet(columns: Mapping[str, str] | Iterable[tuple[str, str]]) -> Any:
    from airflow.providers.common.compat.openlineage.facet import SchemaDatasetFacet, SchemaDatasetFacetFields

    items = columns.items() if isinstance(columns, Mapping) else columns
    return SchemaDatasetFacet(fields=[SchemaDatasetFacetFields(name=n, type=str(t)) for n, t in items])


def _arrow_columns(schema: pa.Schema) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in schema]


def _input(namespace: str, name: str, facets: dict[str, Any], rows: int | None = None) -> Any:
    from airflow.providers.common.compat.openlineage.facet import InputDataset
    from openlineage.client.generated.input_statistics_input_dataset import InputStatisticsInputDatasetFacet

    input_facets = {"inputStatistics": InputStatisticsInputDatasetFacet(rowCount=rows)} if rows else {}
    return InputDataset(namespace=namespace, name=name, facets=facets, inputFacets=input_facets)


def _output(namespace: str, name: str, facets: dict[str, Any], rows: int | None, files: int | None) -> Any:
    from airflow.providers.common.compat.openlineage.facet import (
        OutputDataset,
        OutputStatisticsOutputDatasetFacet,
    )

    stats = OutputStatisticsOutputDatasetFacet(rowCount=rows, fileCount=files)
    return OutputDataset(
        namespace=namespace, name=name, facets=facets, outputFacets={"outputStatistics": stats}
    )


def _lineage(inputs: list[Any], outputs: list[Any], job_facets: dict[str, Any] | None = None) -> Any:
    from airflow.providers.openlineage.extractors import OperatorLineage

    return OperatorLineage(inputs=inputs, outputs=outputs, job_facets=job_facets or {})


def snapshot_dataset(manifest: Manifest, *, as_output: bool) -> Any:
    """The run's snapshot (its ``manifest.json``), with the staged schema and row count."""
    namespace, name = file_dataset(str(run_file(manifest.run_dir, MANIFEST)))
    facets = {"schema": _schema_facet(manifest.schema)}
    if as_output:
        return _output(namespace, name, facets, manifest.total_rows, len(manifest.files) or None)
    return _input(namespace, name, facets, manifest.total_rows)


def sql_datasets(sql: str, conn_id: str | None, database: str | None, schema: Mapping[str, str]) -> list[Any]:
    """The tables a query reads, named in its connection's namespace (``postgres://host:port``, ...).

    :param sql: the query.
    :param conn_id: its common-sql connection; ``None`` for the embedded DuckDB file ``database``.
    :param database: the DuckDB file of the embedded warehouse.
    :param schema: the staged columns, set on each table read (the columns a query returns).
    """
    from openlineage.common.sql import parse

    if conn_id is None:
        from airflow_batch_infer.paths import batch_infer_home

        namespace = f"duckdb://{storage.plain_url(database or str(batch_infer_home() / 'warehouse.duckdb'))}"
        default_db, default_schema, dialect = None, "main", "duckdb"
    else:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
        port = conn.port or {"postgres": 5432}.get(conn.conn_type)
        namespace = f"{conn.conn_type}://{conn.host}{f':{port}' if port else ''}"
        default_db, default_schema, dialect = conn.schema, "public", conn.conn_type
    parsed = parse([sql], dialect=dialect, default_schema=default_schema)
    tables = parsed.in_tables if parsed else []
    datasets = []
    for table in tables:
        parts = [table.database or default_db, table.schema or default_schema, table.name]
        datasets.append(_input(namespace, ".".join(p for p in parts if p), {"schema": _schema_facet(schema)}))
    return datasets


def stage_lineage(
    manifest: Manifest,
    sources: Sequence[str],
    sql: str | None,
    sql_conn_id: str | None,
    sql_database: str | None,
) -> Any:
    """stage: the input (files, folders or the query's tables) → the snapshot.

    :param manifest: the snapshot the stage task wrote.
    :param sources: the Parquet files or folders given (none for a query).
    :param sql: the query, if the input is one.
    :param sql_conn_id: the query's connection.
    :param sql_database: the embedded DuckDB file, for a query on no connection.
    """
    from airflow.providers.common.compat.openlineage.facet import SQLJobFacet

    facets = {"schema": _schema_facet(manifest.schema)}
    if sql:
        inputs = sql_datasets(sql, sql_conn_id, sql_database, manifest.schema)
        return _lineage(inputs, [snapshot_dataset(manifest, as_output=True)], {"sql": SQLJobFacet(query=sql)})
    inputs = []
    for source in sources:
        namespace, name = file_dataset(source)
        inputs.append(_input(namespace, name, facets, manifest.total_rows if len(sources) == 1 else None))
    return _lineage(inputs, [snapshot_dataset(manifest, as_output=True)])


def model_dataset(namespace: str, name: str, version: str | None, tensors: Mapping[str, str]) -> Any:
    """A model as a dataset: its tensors as the schema, its version as the dataset version."""
    from openlineage.client.generated.dataset_version_dataset import DatasetVersionDatasetFacet

    facets: dict[str, Any] = {"schema": _schema_facet(tensors)}
    if version:
        facets["version"] = DatasetVersionDatasetFacet(datasetVersion=str(version))
    return _input(namespace, name, facets)


def repository_model_datasets(repository: str, models: Sequence[str]) -> list[Any]:
    """start: each model in its repository (``<repository>/<model>``), its newest version directory as the
    version and no schema (the server reports the tensors to the infer task)."""
    datasets = []
    for model in models:
        folder = storage.join(storage.location(repository), model)
        namespace, name = file_dataset(folder)
        try:
            versions = sorted(
                int(p.rstrip("/").rsplit("/", 1)[-1])
                for p in storage.list_folders(folder)
                if p.rstrip("/").rsplit("/", 1)[-1].isdigit()
            )
        except Exception:
            versions = []
        datasets.append(model_dataset(namespace, name, str(versions[-1]) if versions else None, {}))
    return datasets


def start_lineage(repository: str, models: Sequence[str] | None) -> Any:
    """start: the models the servers load (every model of the repository when ``None``), as inputs."""
    if models is None:
        models = [
            p.rstrip("/").rsplit("/", 1)[-1] for p in storage.list_folders(storage.location(repository))
        ]
    return _lineage(repository_model_datasets(repository, models), [])


def served_model_dataset(grpc_url: str, model_name: str, metadata: Mapping[str, Any]) -> Any:
    """infer: the model as the server served it (``triton://host:port``, the model's name, the version that
    answered and its input and output tensors)."""
    tensors = {
        t["name"]: f"{t.get('datatype')}{list(t.get('shape') or [])}"
        for t in [*metadata.get("inputs", []), *metadata.get("outputs", [])]
    }
    versions = metadata.get("versions") or []
    return model_dataset(
        f"triton://{grpc_url}", model_name, str(max(versions, key=int)) if versions else None, tensors
    )


def infer_lineage(
    manifest: Manifest, model: Any, output_part: str, rows_out: int, rejects_part: str, rows_rejected: int
) -> Any:
    """infer: the snapshot and the model → the chunk's output and rejects parts."""
    outputs = []
    for part, rows in ((output_part, rows_out), (rejects_part, rows_rejected)):
        namespace, name = file_dataset(part)
        outputs.append(_output(namespace, name, {}, rows, 1))
    return _lineage([snapshot_dataset(manifest, as_output=False), model], outputs)


def persist_lineage(
    manifest: Manifest,
    output: TableLocation,
    rows: int,
    rejected: int,
    output_schema: pa.Schema | None,
    rejects_schema: pa.Schema | None,
) -> Any:
    """persist: the run's parts → the output table and ``<table>_rejects``, with schemas and rows written.

    :param manifest: the run's snapshot.
    :param output: the output table's location (:func:`~airflow_batch_infer.assets.table_location`).
    :param rows: rows now in the run's partition of the output table.
    :param rejected: rows now in the run's partition of the rejects table.
    :param output_schema: the output parts' schema (the table's columns but the partition column).
    :param rejects_schema: the rejects parts' schema.
    """
    datasets = []
    for name, count, schema in (
        (output.name, rows, output_schema),
        (output.name + REJECTS_SUFFIX, rejected, rejects_schema),
    ):
        facets = {"schema": _schema_facet(_arrow_columns(schema))} if schema is not None else {}
        datasets.append(_output(output.namespace, name, facets, count, None))
    return _lineage([snapshot_dataset(manifest, as_output=False)], datasets)
