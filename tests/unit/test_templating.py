"""Templated arguments: which fields render, and how their rendered text is read back."""

from __future__ import annotations

import pytest

from airflow_batch_infer.operators.generate import TritonGenerateOperator
from airflow_batch_infer.operators.infer import TritonInferenceOperator
from airflow_batch_infer.operators.persist import PersistOutputsOperator
from airflow_batch_infer.operators.stage import StageInputsOperator
from airflow_batch_infer.templated import as_list, as_mapping, as_optional_fraction


def test_the_issue_fields_are_templated_with_json_renderers() -> None:
    assert {"inputs", "outputs", "passthrough_columns"} <= set(TritonInferenceOperator.template_fields)
    assert {"inputs", "outputs", "passthrough_columns", "prompt_template", "generation"} <= set(
        TritonGenerateOperator.template_fields
    )
    assert "row_id_column" in StageInputsOperator.template_fields
    assert "max_rejected_fraction" in PersistOutputsOperator.template_fields
    for operator, fields in (
        (TritonInferenceOperator, ("inputs", "outputs", "passthrough_columns")),
        (TritonGenerateOperator, ("inputs", "generation")),
        (StageInputsOperator, ("sink_options", "sql_parameters", "columns")),
        (PersistOutputsOperator, ("sink_options",)),
    ):
        assert {f: operator.template_fields_renderers[f] for f in fields} == dict.fromkeys(fields, "json")


def test_rendered_text_is_read_back() -> None:
    assert as_mapping('{"features": ["f00", "f01"]}', "inputs") == {"features": ["f00", "f01"]}
    assert as_mapping({"x": "a"}, "inputs") == {"x": "a"}
    assert as_mapping("", "outputs") == {}
    assert as_list('["transaction_id", "amount"]', "passthrough_columns") == ["transaction_id", "amount"]
    assert as_list("transaction_id", "passthrough_columns") == ["transaction_id"]
    assert as_list("", "passthrough_columns") == []
    assert as_optional_fraction("0.25", "max_rejected_fraction") == 0.25
    assert as_optional_fraction("", "max_rejected_fraction") is None


def test_bad_rendered_text_names_the_argument_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"inputs must be a JSON object or its JSON text.*tojson"):
        as_mapping("{'features': ['f00']}", "inputs")  # a dict rendered without | tojson
    with pytest.raises(ValueError, match=r"outputs must be a mapping.*list"):
        as_mapping('["probability"]', "outputs")
    with pytest.raises(ValueError, match=r"passthrough_columns must be a list of column names"):
        as_list("[1, 2]", "passthrough_columns")
    with pytest.raises(ValueError, match=r"max_rejected_fraction must be between 0 and 1.*5.0"):
        as_optional_fraction("5", "max_rejected_fraction")
    with pytest.raises(ValueError, match=r"max_rejected_fraction must be a number"):
        as_optional_fraction("a lot", "max_rejected_fraction")


def test_a_generate_operator_takes_its_inputs_and_prompt_as_rendered() -> None:
    operator = TritonGenerateOperator(
        task_id="g",
        chunk={},
        model_name="tiny_llm",
        prompt_template="{{ params.prompt }}",
        inputs='{"bad_words": "banned"}',
        parameter_columns={"max_tokens": "summary_len"},
    )
    operator.prompt_template = "Summarise: {body}"  # as Jinja rendered it
    operator.resolve_templated()
    assert operator.inputs == {"bad_words": "banned", "max_tokens": "summary_len"}
    assert operator.input_templates == {"text_input": "Summarise: {body}"}
