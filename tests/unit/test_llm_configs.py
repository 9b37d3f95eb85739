"""The TensorRT-LLM model repository: the script fills the templates (the only copy in git) into a fresh
repository, as ``make llm-repository`` does; every filled config parses with Triton's own ``ModelConfig``
proto and has the settings asked for, the ensemble's steps are wired to tensors that exist, the CPU stand-in
has exactly the ensemble's contract, and the generate operator fits itself to that contract."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from airflow_batch_infer.client.tensors import bind_inputs, bind_outputs
from tests.conftest import MODEL_REPOSITORY, REPO

LLM = MODEL_REPOSITORY / "llm"
TEMPLATES = LLM / "templates"
DOCUMENTED = {
    "engine_dir": "/engines/llm",
    "tokenizer_dir": "/tokenizer",
    "max_batch_size": 256,
    "kv_cache_fraction": 0.9,
}
STEPS = ["preprocessing", "tensorrt_llm", "postprocessing"]
Config = model_config_pb2.ModelConfig

# The ensemble's core contract, as DESIGN.md gives it from NVIDIA's inflight_batcher_llm ensemble:
# name → (datatype, dims, optional).
CORE_INPUTS = {
    "text_input": ("TYPE_STRING", [1], False),
    "max_tokens": ("TYPE_INT32", [1], False),
    **{n: ("TYPE_STRING", [-1], True) for n in ("bad_words", "stop_words")},
    **{
        n: ("TYPE_INT32", [1], True)
        for n in ("end_id", "pad_id", "top_k", "min_tokens", "beam_width", "num_return_sequences")
    },
    **{
        n: ("TYPE_FP32", [1], True)
        for n in (
            "top_p",
            "temperature",
            "length_penalty",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        )
    },
    "seed": ("TYPE_UINT64", [1], True),
    **{
        n: ("TYPE_BOOL", [1], True)
        for n in (
            "exclude_input_in_output",
            "stream",
            "return_log_probs",
            "return_num_input_tokens",
            "return_num_output_tokens",
        )
    },
}
CORE_OUTPUTS = {
    "text_output": ("TYPE_STRING", [-1]),
    "cum_log_probs": ("TYPE_FP32", [-1]),
    "output_log_probs": ("TYPE_FP32", [-1, -1]),
    **{
        n: ("TYPE_INT32", [1])
        for n in ("batch_index", "sequence_index", "num_input_tokens", "num_output_tokens")
    },
}


def load_script():
    spec = importlib.util.spec_from_file_location(
        "fill_llm_repository", REPO / "scripts" / "fill_llm_repository.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(path: Path) -> Any:
    return text_format.Parse(path.read_text(encoding="utf-8"), Config())


def configs(repository: Path) -> dict[str, Any]:
    return {model: parse(repository / model / "config.pbtxt") for model in ["ensemble", *STEPS]}


def params(config: Any) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def tensors(items: Any) -> dict[str, tuple[str, list[int], bool]]:
    return {
        t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims), getattr(t, "optional", False))
        for t in items
    }


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """The repository ``make llm-repository`` writes, with the documented container paths."""
    repository = tmp_path_factory.mktemp("llm") / "repository"
    load_script().fill_repository(repository, **DOCUMENTED)
    return repository


@pytest.fixture(scope="module")
def filled(generated) -> dict[str, Any]:
    return configs(generated)


def test_the_script_writes_the_templates_filled_and_their_other_files_as_they_are(tmp_path) -> None:
    script = load_script()
    written = script.fill_repository(tmp_path / "repo", **DOCUMENTED)
    assert len(written) == 8
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == sorted(["ensemble", *STEPS])
    values = script.template_fields(**DOCUMENTED)
    expected = {
        name: (
            script._HEADER.format(model=name.split("/")[0]) + script.fill(data.decode("utf-8"), values, name)
        ).encode("utf-8")
        if name.endswith("config.pbtxt")
        else data
        for name, data in files(TEMPLATES).items()
    }
    assert files(tmp_path / "repo") == expected


def test_nothing_is_left_unfilled(generated) -> None:
    for path in generated.rglob("*"):
        if path.is_file():
            assert "${" not in path.read_text(encoding="utf-8"), path
    templates = "".join(p.read_text() for p in TEMPLATES.rglob("config.pbtxt"))
    assert "${engine_dir}" in templates
    assert "${kv_cache_free_gpu_mem_fraction}" in templates


def test_the_engine_model_is_tensorrt_llm_with_inflight_fused_batching(filled) -> None:
    engine = filled["tensorrt_llm"]
    assert engine.backend == "tensorrtllm"
    assert engine.max_batch_size == 256
    assert engine.model_transaction_policy.decoupled is False
    assert list(engine.dynamic_batching.preferred_batch_size) == [256]
    assert engine.dynamic_batching.max_queue_delay_microseconds == 1000
    assert params(engine) == {
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": "/engines/llm",
        "max_beam_width": "1",
        "batch_scheduler_policy": "guaranteed_no_evict",
        "kv_cache_free_gpu_mem_fraction": "0.9",
        "enable_kv_cache_reuse": "false",
        "exclude_input_in_output": "true",
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
    }


@pytest.mark.parametrize("model", ["preprocessing", "postprocessing"])
def test_the_tokenizer_models_read_the_tokenizer_folder(filled, generated, model) -> None:
    config = filled[model]
    assert (config.backend, config.max_batch_size) == ("python", 256)
    assert params(config)["tokenizer_dir"] == "/tokenizer"
    assert config.instance_group[0].count == 4
    source = (generated / model / "1" / "model.py").read_text()
    assert "AutoTokenizer.from_pretrained" in source
    assert '"tokenizer_dir"' in source


def test_the_ensemble_steps_are_wired_to_tensors_that_exist(filled) -> None:
    ensemble = filled["ensemble"]
    assert (ensemble.platform, ensemble.max_batch_size) == ("ensemble", 256)
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == STEPS
    ens_in, ens_out = tensors(ensemble.input), tensors(ensemble.output)
    available = {name: (spec[0], spec[2]) for name, spec in ens_in.items()}  # tensor → (type, optional)
    consumed: set[str] = set()
    produced: dict[str, str] = {}
    for step in steps:
        model = filled[step.model_name]
        model_in, model_out = tensors(model.input), tensors(model.output)
        for key, value in step.input_map.items():
            assert key in model_in, f"{step.model_name} has no input {key}"
            assert value in available, f"{step.model_name}.{key} reads {value}, which nothing provides"
            assert model_in[key][0] == available[value][0], f"{step.model_name}.{key} vs {value}: types"
            if available[value][1]:
                assert model_in[key][2], f"optional {value} feeds required {step.model_name}.{key}"
            consumed.add(value)
        required = {n for n, spec in model_in.items() if not spec[2]}
        assert required <= set(step.input_map), f"{step.model_name} misses {required - set(step.input_map)}"
        for key, value in step.output_map.items():
            assert key in model_out, f"{step.model_name} has no output {key}"
            assert value not in produced, f"{value} is produced twice"
            produced[value] = step.model_name
            available[value] = (model_out[key][0], False)
            if value in ens_out:
                assert ens_out[value][0] == model_out[key][0], value
    assert set(ens_out) <= set(produced), f"outputs nobody produces: {set(ens_out) - set(produced)}"
    assert set(ens_in) <= consumed, f"inputs nobody reads: {set(ens_in) - consumed}"
    internal = {t for t in produced if t not in ens_out}
    assert internal <= consumed, f"internal tensors nobody reads: {internal - consumed}"


def test_the_ensemble_and_the_stand_in_have_the_core_contract(filled) -> None:
    stand_in = parse(MODEL_REPOSITORY / "llm_stand_in" / "config.pbtxt")
    ensemble = filled["ensemble"]
    assert tensors(ensemble.input) == CORE_INPUTS
    assert {n: s[:2] for n, s in tensors(ensemble.output).items()} == CORE_OUTPUTS
    assert tensors(stand_in.input) == tensors(ensemble.input)
    assert tensors(stand_in.output) == tensors(ensemble.output)
    assert stand_in.backend == "python"
    assert stand_in.max_batch_size > 1


def test_the_script_fills_what_it_is_given_and_refuses_bad_values(tmp_path) -> None:
    script = load_script()
    assert (
        script.main(
            [
                "--engine-dir=/mnt/engines/llama",
                "--tokenizer-dir=/mnt/hf/llama",
                "--max-batch-size=64",
                "--kv-cache-fraction=0.5",
                "--batch-scheduler-policy=max_utilization",
                "--kv-cache-reuse",
                f"--output={tmp_path}",
            ]
        )
        == 0
    )
    written = configs(tmp_path)
    assert {c.max_batch_size for c in written.values()} == {64}
    engine = params(written["tensorrt_llm"])
    assert engine["gpt_model_path"] == "/mnt/engines/llama"
    assert (engine["kv_cache_free_gpu_mem_fraction"], engine["batch_scheduler_policy"]) == (
        "0.5",
        "max_utilization",
    )
    assert engine["enable_kv_cache_reuse"] == "true"
    assert params(written["postprocessing"])["tokenizer_dir"] == "/mnt/hf/llama"

    with pytest.raises(ValueError, match="kv-cache-fraction"):
        script.template_fields(engine_dir="/e", tokenizer_dir="/t", kv_cache_fraction=1.5)
    with pytest.raises(KeyError, match=r"\['lora_dir'\]"):
        script.fill("path: ${lora_dir}", {}, "x")
    assert (
        script.main(["--engine-dir=/e", "--tokenizer-dir=/t", "--max-batch-size=0", f"--output={tmp_path}"])
        == 2
    )


def metadata_of(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the server would report for ``config``: metadata (batch dim in shapes) and JSON config."""

    def spec(t: Any) -> dict[str, Any]:
        datatype = model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_")
        return {
            "name": t.name,
            "datatype": "BYTES" if datatype == "STRING" else datatype,
            "shape": [-1, *t.dims],
        }

    metadata = {
        "name": config.name,
        "inputs": [spec(t) for t in config.input],
        "outputs": [spec(t) for t in config.output],
    }
    as_json = {
        "max_batch_size": config.max_batch_size,
        "input": [{"name": t.name, "optional": t.optional} for t in config.input],
    }
    return metadata, as_json


def test_the_generate_operator_fits_the_real_ensemble(filled) -> None:
    from airflow_batch_infer.operators.generate import TritonGenerateOperator

    metadata, config = metadata_of(filled["ensemble"])
    operator = TritonGenerateOperator(
        task_id="generate",
        chunk={},
        model_name="ensemble",
        prompt_template="{title}\n{body}\nSummary:",
        generation={
            "max_tokens": "{{ params.max_tokens }}",
            "top_k": 1,
            "stop_words": ["\n\n"],
            "bad_words": [],
        },
        parameter_columns={"temperature": "temp"},
    )
    operator.generation["max_tokens"] = "64"  # as Jinja renders it
    operator.prepare_for_model(metadata, config)

    assert operator.outputs == {
        "text_output": "generated_text",
        "num_input_tokens": "input_tokens",
        "num_output_tokens": "output_tokens",
    }
    assert operator.input_constants == {
        "max_tokens": 64,
        "top_k": 1,
        "stop_words": ["\n\n"],  # bad_words=[] means none: the optional input is left out
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
        "exclude_input_in_output": True,
    }
    assert (operator.request_rows, operator.max_in_flight) == (1, 512)
    assert (operator.token_count_output, operator.shared_memory, operator.request_timeout) == (
        "num_output_tokens",
        "off",
        600.0,
    )
    schema = pa.schema([("title", pa.string()), ("body", pa.string()), ("temp", pa.float64())])
    optional = [i["name"] for i in config["input"] if i["optional"]]
    bound = bind_inputs(
        operator.inputs,
        schema,
        metadata,
        256,
        templates=operator.input_templates,
        constants=operator.input_constants,
        optional=optional,
    )
    assert {b.tensor for b in bound} == {"text_input", "temperature", *operator.input_constants}
    assert [b.tensor for b in bind_outputs(operator.outputs, metadata, 256)] == list(operator.outputs)


def test_the_generate_operator_keeps_to_what_a_model_declares() -> None:
    from airflow_batch_infer.client.tensors import ContractError
    from airflow_batch_infer.operators.generate import TritonGenerateOperator

    metadata = {
        "name": "tiny_llm",
        "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]},
            {"name": "max_tokens", "datatype": "INT32", "shape": [-1, 1]},
        ],
        "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1, -1]}],
    }
    config = {"max_batch_size": 4000, "instance_group": [{"count": 2}]}
    operator = TritonGenerateOperator(task_id="g", chunk={}, model_name="tiny_llm", prompt_template="{q}")
    operator.prepare_for_model(metadata, config)
    assert operator.outputs == {"text_output": "generated_text"}
    assert operator.input_constants == {"max_tokens": 128}
    assert operator.token_count_output is None
    assert operator.max_in_flight == 1024  # 2 × 4000 × 2, capped

    for bad in ({"seed": 3}, {"temperature": 0.2}):
        with pytest.raises(ContractError, match=r"not inputs of model 'tiny_llm'; it takes \['max_tokens'\]"):
            TritonGenerateOperator(
                task_id="g", chunk={}, model_name="tiny_llm", prompt_template="{q}", generation=bad
            ).prepare_for_model(metadata, config)
    with pytest.raises(ContractError, match="no 'text_input' input"):
        operator.prepare_for_model(
            {"name": "scorer", "inputs": [{"name": "features"}], "outputs": []}, config
        )
