"""Column → tensor mapping: the contract check's messages and the encoding of record batches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from airflow_batch_infer.client.sizing import resolve_sizes
from airflow_batch_infer.client.tensors import ContractError, bind_inputs, bind_outputs, encode_batch

METADATA = {
    "name": "scorer",
    "inputs": [{"name": "features", "datatype": "FP32", "shape": ["-1", "3"]}],
    "outputs": [{"name": "probability", "datatype": "FP32", "shape": ["-1", "1"]}],
}
SCHEMA = pa.schema([("a", pa.float64()), ("b", pa.int64()), ("c", pa.float32()), ("s", pa.string())])


def test_scalar_columns_stack_into_one_tensor() -> None:
    [binding] = bind_inputs({"features": ["a", "b", "c"]}, SCHEMA, METADATA, 1024)
    assert (binding.tensor, binding.width, binding.columns) == ("features", 3, ("a", "b", "c"))
    [out] = bind_outputs({"probability": "score"}, METADATA, 1024)
    assert (out.column, out.width) == ("score", 1)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"features": ["a", "b", "s"]},
            "Column 's' is string but input tensor 'features' of model 'scorer' is FP32",
        ),
        ({"features": ["a", "b"]}, r"takes 3 values a row \(shape \['-1', '3'\]\) but 2 column\(s\)"),
        ({"features": ["a", "b", "zz"]}, "Column 'zz' \\(for input tensor 'features'\\) is not in the data"),
        ({"feats": ["a", "b", "c"]}, "needs input tensor\\(s\\) \\['features'\\]"),
    ],
)
def test_mismatches_name_column_tensor_and_types(inputs: dict, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        bind_inputs(inputs, SCHEMA, METADATA, 1024)


def test_unknown_tensors_and_unbatched_models_are_refused() -> None:
    with pytest.raises(ContractError, match=r"no input tensor\(s\) \['extra'\]"):
        bind_inputs({"features": ["a", "b", "c"], "extra": "a"}, SCHEMA, METADATA, 1024)
    with pytest.raises(ContractError, match="no output tensor 'logits'"):
        bind_outputs({"logits": "x"}, METADATA, 1024)
    with pytest.raises(ContractError, match="max_batch_size 0"):
        bind_inputs({"features": ["a", "b", "c"]}, SCHEMA, METADATA, 0)


def test_list_column_width_is_checked() -> None:
    schema = pa.schema([("v", pa.list_(pa.float32(), 4))])
    with pytest.raises(ContractError, match="Column 'v' holds 4 values a row but input tensor 'features'"):
        bind_inputs({"features": "v"}, schema, METADATA, 8)


def test_encoding_sets_aside_nulls_nan_and_infinities() -> None:
    batch = pa.record_batch(
        {
            "a": pa.array([1.0, None, 3.0, float("nan"), 5.0]),
            "b": pa.array([1, 2, 3, 4, 5]),
            "c": pa.array([0.5, 0.5, float("inf"), 0.5, 0.5], pa.float32()),
        }
    )
    bindings = bind_inputs({"features": ["a", "b", "c"]}, batch.schema, METADATA, 1024)
    tensors, good, reasons = encode_batch(batch, bindings)
    assert good.tolist() == [True, False, False, False, True]
    assert reasons == {
        1: "null in column 'a'",
        2: "NaN or infinite value in column 'c'",
        3: "NaN or infinite value in column 'a'",
    }
    assert tensors["features"].dtype == np.float32
    np.testing.assert_array_equal(tensors["features"][[0, 4]], [[1.0, 1.0, 0.5], [5.0, 5.0, 0.5]])


@pytest.mark.parametrize("into_given", [False, True])
def test_columns_land_side_by_side_in_row_order(into_given: bool) -> None:
    rows = 20_123
    rng = np.random.default_rng(3)
    a, b, c = rng.random(rows), np.arange(rows), rng.random(rows, dtype=np.float32)
    batch = pa.record_batch({"a": a, "b": b, "c": c})
    bindings = bind_inputs({"features": ["a", "b", "c"]}, batch.schema, METADATA, 1024)
    into = {"features": np.full((rows + 10, 3), -1.0, dtype=np.float32)} if into_given else None
    tensors, good, _ = encode_batch(batch, bindings, into)
    expected = np.column_stack([a, b, c]).astype(np.float32)
    np.testing.assert_array_equal(tensors["features"], expected)
    assert good.all()
    if into is not None:
        assert np.shares_memory(tensors["features"], into["features"])
        assert (into["features"][rows:] == -1.0).all()  # nothing written past the batch's rows


def test_large_finite_values_are_kept() -> None:
    # Their sum overflows float32 (the quick check for NaN and infinities); every row is still sent.
    batch = pa.record_batch({"a": [3e38, 3e38], "b": [1, 2], "c": pa.array([3e38, -1.0], pa.float32())})
    bindings = bind_inputs({"features": ["a", "b", "c"]}, batch.schema, METADATA, 1024)
    tensors, good, reasons = encode_batch(batch, bindings)
    assert good.tolist() == [True, True]
    assert reasons == {}
    np.testing.assert_array_equal(tensors["features"][:, 0], np.float32([3e38, 3e38]))


def test_list_columns_encode_row_by_row() -> None:
    batch = pa.record_batch({"v": pa.array([[1, 2, 3], None, [4, 5], [7, 8, 9]], pa.list_(pa.float64()))})
    bindings = bind_inputs({"features": "v"}, batch.schema, METADATA, 1024)
    tensors, good, reasons = encode_batch(batch, bindings)
    assert good.tolist() == [True, False, False, True]
    assert reasons[1] == "null in column 'v'"
    assert reasons[2] == "column 'v' does not hold 3 values"
    np.testing.assert_array_equal(tensors["features"][[0, 3]], [[1, 2, 3], [7, 8, 9]])


def test_request_sizes_default_from_the_model_config() -> None:
    config = {
        "max_batch_size": 8192,
        "dynamic_batching": {"preferred_batch_size": [4096, 8192]},
        "instance_group": [{"count": 2}],
    }
    assert resolve_sizes(config, None, "") == (8192, 4)
    assert resolve_sizes(config, "1024", "3") == (1024, 3)
    assert resolve_sizes({"max_batch_size": 64}, None, None) == (64, 2)
    with pytest.raises(ValueError, match="larger than the model's max_batch_size=8192"):
        resolve_sizes(config, 10_000, None)


LLM_METADATA = {
    "name": "llm",
    "inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": ["-1", "1"]},
        {"name": "max_tokens", "datatype": "INT32", "shape": ["-1", "1"]},
        {"name": "temperature", "datatype": "FP32", "shape": ["-1", "1"]},
        {"name": "stop_words", "datatype": "BYTES", "shape": ["-1", "-1"]},
        {"name": "seed", "datatype": "UINT64", "shape": ["-1", "1"]},
    ],
    "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": ["-1", "-1"]}],
}
DOCS = pa.record_batch(
    {
        "title": pa.array(["Q3 report", "Memo", None]),
        "body": pa.array(["Revenue grew.", "Office closed {Friday}.", "x"]),
        "budget": pa.array([64, 8, 16], pa.int64()),
    }
)


def test_prompts_render_from_a_template_and_parameters_come_from_constants_or_columns() -> None:
    bindings = bind_inputs(
        {"max_tokens": "budget"},
        DOCS.schema,
        LLM_METADATA,
        64,
        templates={"text_input": "Summarise '{title}': {body}"},
        constants={"temperature": 0.2, "stop_words": ["\n\n", "END"]},
        optional=["seed"],
    )
    tensors, good, reasons = encode_batch(DOCS, bindings)
    assert tensors["text_input"][:2, 0].tolist() == [
        b"Summarise 'Q3 report': Revenue grew.",
        b"Summarise 'Memo': Office closed {Friday}.",
    ]
    assert good.tolist() == [True, True, False]
    assert reasons[2] == "null in column 'title'"
    assert tensors["max_tokens"].dtype == np.int32
    assert tensors["max_tokens"][:, 0].tolist() == [64, 8, 16]
    assert tensors["temperature"].dtype == np.float32
    assert tensors["temperature"].shape == (3, 1)
    assert tensors["stop_words"].tolist() == [[b"\n\n", b"END"]] * 3


def test_template_and_constant_mismatches_are_named() -> None:
    with pytest.raises(ContractError, match=r"uses column\(s\) \['summary'\] that are not in the data"):
        bind_inputs(
            {"max_tokens": "budget"},
            DOCS.schema,
            LLM_METADATA,
            64,
            templates={"text_input": "{summary}"},
            optional=["temperature", "stop_words", "seed"],
        )
    with pytest.raises(
        ContractError, match="A template renders one string a row, but input tensor 'max_tokens'"
    ):
        bind_inputs(
            {},
            DOCS.schema,
            LLM_METADATA,
            64,
            templates={"text_input": "{body}", "max_tokens": "{body}"},
            optional=["temperature", "stop_words", "seed"],
        )
    with pytest.raises(ContractError, match=r"Constant 2\.5 does not fit input tensor 'max_tokens'"):
        bind_inputs(
            {},
            DOCS.schema,
            LLM_METADATA,
            64,
            templates={"text_input": "{body}"},
            constants={"max_tokens": 2.5},
            optional=["temperature", "stop_words", "seed"],
        )
    with pytest.raises(
        ContractError, match=r"needs input tensor\(s\) \['max_tokens', 'seed', 'stop_words', 'temperature'\]"
    ):
        bind_inputs({}, DOCS.schema, LLM_METADATA, 64, templates={"text_input": "{body}"})


def test_a_list_of_words_per_row_is_padded_for_a_variable_width_tensor() -> None:
    batch = pa.record_batch(
        {
            "body": pa.array(["a", "b", "c"]),
            "stops": pa.array([["END"], ["\n\n", "STOP"], None], pa.list_(pa.string())),
        }
    )
    bindings = bind_inputs(
        {"stop_words": "stops"},
        batch.schema,
        LLM_METADATA,
        64,
        templates={"text_input": "{body}"},
        constants={"max_tokens": 8},
        optional=["temperature", "seed"],
    )
    tensors, good, reasons = encode_batch(batch, bindings)
    assert tensors["stop_words"][:2].tolist() == [[b"END", b""], [b"\n\n", b"STOP"]]
    assert good.tolist() == [True, True, False]
    assert reasons[2] == "null in column 'stops'"


@pytest.mark.parametrize(
    "arrow_type", [pa.int8(), pa.int32(), pa.uint64(), pa.float16(), pa.float32(), pa.float64()]
)
def test_numeric_columns_are_read_as_views_of_their_buffers(arrow_type) -> None:
    from airflow_batch_infer.client.tensors import primitive_view

    values = pa.array(np.arange(20) % 7, type=arrow_type)
    sliced = values.slice(5, 9)
    np.testing.assert_array_equal(primitive_view(sliced), sliced.to_numpy())
    assert primitive_view(sliced).dtype == sliced.to_numpy().dtype


@pytest.mark.parametrize("dtype", [np.bool_, np.int32, np.uint64, np.float16, np.float32, np.float64])
def test_outputs_become_arrow_columns_of_the_same_values(dtype) -> None:
    from airflow_batch_infer.client.output_binding import _output_array
    from airflow_batch_infer.client.tensors import OutputBinding

    values = (np.arange(22) % 3).astype(dtype).reshape(11, 2)
    datatype = {np.bool_: "BOOL", np.int32: "INT32", np.uint64: "UINT64"}.get(
        dtype, "FP" + str(np.dtype(dtype).itemsize * 8)
    )
    scalar = _output_array(values[:, :1], OutputBinding("t", datatype, "c", 1))
    pairs = _output_array(values, OutputBinding("t", datatype, "c", 2))
    assert scalar.to_pylist() == values[:, 0].tolist()
    assert pairs.to_pylist() == values.tolist()
