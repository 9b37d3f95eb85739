"""Early checks of a run, before the server works: the column → tensor mapping against the model's
``config.pbtxt`` in the repository, and the outputs' columns that the sink's table must take.

The stage task runs them with the input's schema, so that a mapping the model cannot take fails the run
at its start, not on the first chunk after the server has loaded. The infer task checks the same mapping
again against the server's own metadata (:func:`~airflow_batch_infer.client.tensors.bind_inputs`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from airflow_batch_infer.client.tensors import OutputBinding, bind_inputs, bind_outputs
from airflow_batch_infer.errors import ModelLoadError, UnknownModelError

# config.pbtxt data_type → the datatype that the server's model metadata reports.
_STRING_TYPE = "TYPE_STRING"


def repository_contract(
    model_repository: str | os.PathLike[str], model_name: str
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The model's metadata and config as the server would report them, read from its ``config.pbtxt``.

    ``None`` when the repository is not a local folder (a remote server reads its own) or the config is a
    template (``${triton_max_batch_size}``): the infer task checks against the server then.

    :param model_repository: the model repository (``<model>/config.pbtxt``).
    :param model_name: the model.
    :raises UnknownModelError: the repository has no such model.
    :raises ModelLoadError: its ``config.pbtxt`` cannot be parsed.
    """
    from google.protobuf import text_format

    from airflow_batch_infer.model_config import model_config_pb2, parse_model_config

    root = Path(model_repository)
    if "://" in str(model_repository) or not root.is_dir():
        return None
    path = root / model_name / "config.pbtxt"
    if not path.is_file():
        available = sorted(p.name for p in root.iterdir() if (p / "config.pbtxt").is_file())
        raise UnknownModelError(
            f"Model {model_name!r} is not in the model repository {root} (it has {available}): fix "
            "model_name, or add the model's folder with its config.pbtxt."
        )
    text = path.read_text()
    if "${" in text:
        return None
    try:
        config = parse_model_config(text)
    except text_format.ParseError as error:
        raise ModelLoadError(f"Cannot parse {path}: {error}") from error
    batching = config.max_batch_size > 0

    def tensors(declared: Sequence[Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": t.name,
                "datatype": _datatype(model_config_pb2().DataType.Name(t.data_type)),
                "shape": ([-1] if batching else []) + [int(d) for d in t.dims],
            }
            for t in declared
        ]

    metadata = {"name": model_name, "inputs": tensors(config.input), "outputs": tensors(config.output)}
    model_config = {
        "max_batch_size": config.max_batch_size,
        "input": [{"name": t.name, "optional": t.optional} for t in config.input],
    }
    return metadata, model_config


def _datatype(config_type: str) -> str:
    """``TYPE_FP32`` → ``FP32``; ``TYPE_STRING`` → ``BYTES`` (as model metadata names them)."""
    return "BYTES" if config_type == _STRING_TYPE else config_type.removeprefix("TYPE_")


def check_mapping(
    metadata: Mapping[str, Any],
    config: Mapping[str, Any],
    schema: pa.Schema,
    inputs: Mapping[str, str | Sequence[str]],
    outputs: Mapping[str, str] | None,
    templates: Mapping[str, str] | None = None,
    constants: Mapping[str, Any] | None = None,
) -> list[OutputBinding]:
    """Check the mapping against the model as the infer task will (same checks, same messages).

    :param metadata: the model's metadata (:func:`repository_contract`, or the server's).
    :param config: the model's config (``max_batch_size``, optional inputs).
    :param schema: the staged input's columns.
    :param inputs: input tensor → column(s).
    :param outputs: output tensor → column (``None``: every output under its own name).
    :param templates: BYTES input tensor → template over the row's columns.
    :param constants: input tensor → one value for every row.
    :returns: the output bindings: the columns the outputs will have.
    :raises ContractError: naming the column, the tensor and both types.
    """
    max_batch = int(config.get("max_batch_size") or 0)
    optional = [i["name"] for i in config.get("input", []) if i.get("optional")]
    bind_inputs(
        inputs, schema, metadata, max_batch, templates=templates, constants=constants, optional=optional
    )
    return bind_outputs(outputs, metadata, max_batch)


def outputs_schema(
    schema: pa.Schema, bindings: Sequence[OutputBinding], row_id_column: str, passthrough: Sequence[str]
) -> pa.Schema:
    """The columns of the output parts, as the infer task writes them: row id, passthrough, outputs.

    :param schema: the staged input's columns (the row id column included).
    :param bindings: the output bindings (:func:`check_mapping`).
    :param row_id_column: the row id column.
    :param passthrough: input columns copied to the outputs.
    """
    from airflow_batch_infer.client.output_binding import output_fields

    kept = [schema.field(c) for c in [row_id_column, *passthrough] if c in schema.names]
    return pa.schema(kept + [field for b in bindings for field in output_fields(b)])


def check_before_start(
    schema: pa.Schema,
    row_id_column: str | None,
    *,
    model_name: str,
    model_repository: str,
    inputs: Mapping[str, Any] | str,
    outputs: Mapping[str, Any] | str | None,
    input_templates: Mapping[str, str] | None,
    input_constants: Mapping[str, Any] | None,
    passthrough_columns: Sequence[str],
    table: str | None,
    sink: str | None,
    sink_options: dict[str, Any],
    log: Any,
) -> bool:
    """The stage task's checks before any server starts: the column → tensor mapping against the model's
    ``config.pbtxt``, then the output parts' columns against the sink's existing table; whether the model's
    config could be read here (``False``: the infer tasks check against the server).

    :param schema: the input's columns as staged.
    :param row_id_column: the row id column the outputs carry (``None``: a generated ``row_id``).
    :param model_name: the model.
    :param model_repository: its repository.
    :param inputs: the inputs mapping (or its JSON text, from a template).
    :param outputs: the outputs mapping (or its JSON text).
    :param input_templates: BYTES inputs built from templates.
    :param input_constants: inputs sent as constants.
    :param passthrough_columns: input columns copied to the outputs.
    :param table: the output table (``None``: not known here).
    :param sink: the sink (``None``: not known here).
    :param sink_options: the sink's options.
    :param log: where to say what was checked.
    """
    from airflow_batch_infer.sinks.table_checks import check_output_table
    from airflow_batch_infer.staging import DEFAULT_ROW_ID_COLUMN
    from airflow_batch_infer.templated import as_list, as_mapping

    contract = repository_contract(model_repository, model_name)
    if contract is None:
        log.info(
            "Model %r: no local config.pbtxt to check against; the infer task checks the mapping against "
            "the server.",
            model_name,
        )
        return False
    id_column = row_id_column or DEFAULT_ROW_ID_COLUMN
    if id_column not in schema.names:
        schema = schema.insert(0, pa.field(id_column, pa.int64()))
    inputs, outputs = as_mapping(inputs, "inputs"), as_mapping(outputs, "outputs") or None
    bindings = check_mapping(*contract, schema, inputs, outputs, input_templates, input_constants)
    log.info(
        "Contract checked before the server starts: model %r (%s) takes inputs %s and gives outputs %s.",
        model_name,
        model_repository,
        inputs,
        {b.tensor: b.column for b in bindings},
    )
    if table and sink:
        if isinstance(passthrough_columns, str):  # "*", or a list's JSON text from a template
            read = {c for v in inputs.values() for c in ([v] if isinstance(v, str) else v)}
            passthrough_columns = (
                [c for c in schema.names if c not in read and c != id_column]
                if passthrough_columns == "*"
                else as_list(passthrough_columns, "passthrough_columns")
            )
        parts = outputs_schema(schema, bindings, id_column, passthrough_columns)
        checked = check_output_table(sink, sink_options, table, parts)
        if checked:
            log.info("The outputs fit the existing %s.", checked)
    return True


def staged_schema(source: Any, columns: Sequence[str] | None, row_id_column: str | None) -> pa.Schema | None:
    """The input's columns as they will be staged, where known before staging (``None``: not known).

    :param source: the stage task's source (its ``schema()``, from the Parquet footers; ``None`` for SQL).
    :param columns: the columns staged (all when empty).
    :param row_id_column: the input's own row id column.
    """
    schema = source.schema()
    if schema is None or not columns:
        return schema
    keep = [c for c in [row_id_column, *columns] if c and c in schema.names]
    if len(keep) < len(columns):  # a column it lacks: staging names it
        return schema
    return pa.schema([schema.field(c) for c in dict.fromkeys(keep)])
