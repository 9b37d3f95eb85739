"""TritonGenerateOperator: LLM text generation over one staged chunk (TensorRT-LLM ensemble on Triton)."""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

from airflow_batch_infer.client.sizing import instance_count
from airflow_batch_infer.errors import ContractError
from airflow_batch_infer.hooks.triton import TritonHook
from airflow_batch_infer.operators.infer import TritonInferenceOperator

#: Output tensor → column, kept to the tensors the model declares (the TensorRT-LLM ensemble has all three).
DEFAULT_OUTPUTS = {
    "text_output": "generated_text",
    "num_input_tokens": "input_tokens",
    "num_output_tokens": "output_tokens",
}
#: Job-level generation parameters used unless ``generation`` or ``parameter_columns`` give them.
DEFAULT_GENERATION: dict[str, Any] = {"max_tokens": 128}
#: Token-count outputs and the BOOL input that makes the backend return each.
TOKEN_COUNT_FLAGS = {
    "num_input_tokens": "return_num_input_tokens",
    "num_output_tokens": "return_num_output_tokens",
}
#: Requests in flight by default: 2 × max_batch_size (one prompt each), within these bounds.
MIN_IN_FLIGHT, MAX_IN_FLIGHT = 8, 1024
_PROMPT_TENSOR = "text_input"
_UNSET = object()


def _is_unset(value: Any) -> bool:
    return value in (None, "", "None")


class TritonGenerateOperator(TritonInferenceOperator):
    """Generate text for every row of one chunk with an LLM served by Triton (TensorRT-LLM ensemble).

    Each row's prompt is ``prompt_template`` formatted with the row's columns and sent as the BYTES
    tensor ``text_input``, one prompt per request: the TensorRT-LLM backend batches requests in flight
    itself, so many are kept outstanding. The outputs are the generated text and, when the model
    declares them, the prompt's and the generated text's token counts (the ``return_num_*_tokens``
    flags are sent for them); tokens/s is logged with rows/s. A row the server refuses as invalid (a
    prompt longer than the engine's ``max_input_len``, say) goes to the rejects with the server's
    message; the other rows carry on.

    Everything else (``chunk``, ``server``, ``triton_conn_id``, ``passthrough_columns``, retries, ...) is as
    in :class:`TritonInferenceOperator`.

    :param chunk: a chunk descriptor from :class:`StageInputsOperator` (the value mapped over).
    :param model_name: the model to call (``ensemble`` for NVIDIA's layout, ``llm_stand_in`` on CPU).
    :param prompt_template: ``str.format`` template over the row's columns, e.g.
        ``"Summarise:\\n{body}\\nSummary:"``. It is templated too: Jinja renders it first
        (``{{ params.x }}``), so a literal brace for ``str.format`` is written ``{{ '{{' }}``.
    :param generation: job-level generation parameters, input tensor → value, such as ``max_tokens``
        (default 128), ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop_words`` and ``bad_words``
        (lists of strings); templated, so ``"{{ params.max_tokens }}"`` works.
    :param parameter_columns: per-row generation parameters, input tensor → column (``max_tokens`` →
        ``"summary_len"``, say); a parameter given here is not also given in ``generation``.
    :param inputs: further input tensor → column mappings, as in :class:`TritonInferenceOperator`.
    :param outputs: output tensor → column; default :data:`DEFAULT_OUTPUTS`, kept to what the model
        declares.
    :param token_count_output: output tensor counting generated tokens, for tokens/s; default
        ``num_output_tokens`` when it is among the outputs.
    :param request_rows: prompts per request (default 1).
    :param max_in_flight: requests outstanding (default 2 × the model's ``max_batch_size`` × instances,
        between 8 and 1024).
    :param request_timeout: seconds one request may take (default 600: long generations are slow).
    :param shared_memory: ``off`` by default (text tensors do not go through shared memory).
    :param transport: ``stream`` (default) or ``unary``.
    """

    template_fields: Sequence[str] = (
        *TritonInferenceOperator.template_fields,
        "generation",
        "prompt_template",
    )
    template_fields_renderers = {**TritonInferenceOperator.template_fields_renderers, "generation": "json"}

    def __init__(
        self,
        *,
        chunk: dict[str, Any],
        model_name: str,
        prompt_template: str,
        generation: Mapping[str, Any] | None = None,
        parameter_columns: Mapping[str, str] | None = None,
        inputs: Mapping[str, str | Sequence[str]] | str | None = None,
        outputs: Mapping[str, str] | str | None = None,
        token_count_output: str | object | None = _UNSET,
        request_rows: int | str | None = None,
        max_in_flight: int | str | None = None,
        request_timeout: float = 600.0,
        shared_memory: str = "off",
        transport: str = "stream",
        triton_conn_id: str = TritonHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        parameter_columns = dict(parameter_columns or {})
        inputs = inputs if isinstance(inputs, str) else dict(inputs or {})  # JSON text: read when it runs
        given = (
            set(generation or {}) | (set(inputs) if isinstance(inputs, dict) else set()) | {_PROMPT_TENSOR}
        )
        clash = sorted(set(parameter_columns) & given)
        if clash:
            raise ValueError(
                f"Generation parameter(s) {clash} are given both per row (parameter_columns) and otherwise "
                "(generation, inputs or the prompt): give each one source."
            )
        super().__init__(
            chunk=chunk,
            model_name=model_name,
            inputs=inputs if isinstance(inputs, str) else {**inputs, **parameter_columns},
            outputs=outputs,
            request_rows=request_rows,
            max_in_flight=max_in_flight,
            request_timeout=request_timeout,
            shared_memory=shared_memory,
            transport=transport,
            triton_conn_id=triton_conn_id,
            input_templates={_PROMPT_TENSOR: prompt_template},
            token_count_output=None if token_count_output is _UNSET else token_count_output,
            **kwargs,
        )
        self.prompt_template = prompt_template
        self.generation = dict(generation or {})
        self.parameter_columns = parameter_columns
        self._default_outputs = outputs is None
        self._default_token_count = token_count_output is _UNSET

    def resolve_templated(self) -> None:
        """The rendered inputs (with the per-row parameters) and prompt template."""
        super().resolve_templated()
        self.inputs = {**self.inputs, **self.parameter_columns}
        self.input_templates = {_PROMPT_TENSOR: self.prompt_template}

    def prepare_for_model(self, metadata: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """Set outputs, constants, token count and request sizes from the model's metadata and config.

        :param metadata: the server's model metadata (inputs and outputs with datatypes and shapes).
        :param config: the model's configuration (``max_batch_size``, instances).
        """
        model = metadata.get("name", self.model_name)
        declared_in = {t["name"]: t for t in metadata.get("inputs", [])}
        declared_out = {t["name"] for t in metadata.get("outputs", [])}
        if _PROMPT_TENSOR not in declared_in:
            raise ContractError(
                f"Model {model!r} has no {_PROMPT_TENSOR!r} input, so it is not a text-generation model of "
                f"the TensorRT-LLM ensemble's kind; its inputs are {sorted(declared_in)}."
            )
        for source, names in (("generation", self.generation), ("parameter_columns", self.parameter_columns)):
            unknown = sorted(set(names) - set(declared_in))
            if unknown:
                raise ContractError(
                    f"Generation parameter(s) {unknown} in {source} are not inputs of model {model!r}; "
                    f"it takes {sorted(set(declared_in) - {_PROMPT_TENSOR})}."
                )
        if self._default_outputs:
            self.outputs = {t: c for t, c in DEFAULT_OUTPUTS.items() if t in declared_out}
        requested = set(self.outputs or declared_out)
        constants = {k: v for k, v in DEFAULT_GENERATION.items() if k in declared_in and k not in self.inputs}
        constants.update(
            {
                flag: True
                for out, flag in TOKEN_COUNT_FLAGS.items()
                if out in requested and flag in declared_in
            }
        )
        if "exclude_input_in_output" in declared_in:
            constants["exclude_input_in_output"] = True  # the generated text only, not the prompt again
        for name, value in self.generation.items():
            constants[name] = _native(value, declared_in[name]["datatype"])
        self.input_constants = {
            k: v for k, v in constants.items() if not (isinstance(v, list | tuple) and not v)
        }  # an empty stop/bad word list means none: leave the optional input out
        if self._default_token_count:
            self.token_count_output = "num_output_tokens" if "num_output_tokens" in requested else None
        if _is_unset(self.request_rows):
            self.request_rows = 1
        if _is_unset(self.max_in_flight):
            max_batch = int(config.get("max_batch_size") or 1)
            wanted = 2 * max_batch * instance_count(config) // max(1, int(self.request_rows))
            self.max_in_flight = max(MIN_IN_FLIGHT, min(MAX_IN_FLIGHT, wanted))


def _native(value: Any, datatype: str) -> Any:
    """A parameter rendered from a template arrives as text: read numbers, booleans and lists back.

    :param value: the parameter's value as given (or rendered).
    :param datatype: the input tensor's Triton datatype.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if datatype == "BYTES" and not (text.startswith("[") and text.endswith("]")):
        return value
    if datatype == "BOOL" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise ContractError(f"Generation parameter value {value!r} is not a {datatype} value.") from error
