"""Outputs the way analysts want them, against a real tritonserver serving a two-class classifier with a
labels file (``triton_models/tumor_classifier``, built from a fixed seed): one column per value, chosen
values, top-k labels from Triton's classification extension, passthrough of every other column, and
post-processing in pandas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowFailException
from transactions_data import FEATURES, write_transactions

from airflow_batch_infer.client.tensors import ContractError, bind_outputs
from airflow_batch_infer.hooks.triton import TritonHook
from airflow_batch_infer.operators.infer import TritonInferenceOperator
from airflow_batch_infer.staging import Manifest, stage_parquet
from tests.conftest import MODEL_REPOSITORY

pytestmark = pytest.mark.integration

MODEL = "tumor_classifier"
INPUTS = FEATURES[:8]
LABELS = ["benign", "malignant"]
ROWS = 5_000


@pytest.fixture(scope="module")
def classifier_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A real local tritonserver serving the classifier (and risk_scorer, which has no labels file)."""
    from airflow_batch_infer.runtimes import get_runtime

    runtime = get_runtime("local", work_root=str(tmp_path_factory.mktemp("servers")))
    info = runtime.start(str(MODEL_REPOSITORY), [MODEL, "risk_scorer"])
    try:
        yield info
    finally:
        runtime.stop(info)


INPUT_DIR: dict[str, Path] = {}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """One chunk of 5,000 transactions, staged by reference."""
    root = tmp_path_factory.mktemp("outputs")
    INPUT_DIR["path"] = root / "in"
    write_transactions(root / "in", ROWS, files=1, row_group_rows=2_000)
    return stage_parquet(root / "in", root / "run", chunk_rows=ROWS)


def reference() -> np.ndarray:
    """The model run directly on the input file: probabilities by row id (the file's row order)."""
    table = pq.read_table(INPUT_DIR["path"] / "part-000.parquet")
    features = np.column_stack([table.column(f).to_numpy() for f in INPUTS]).astype(np.float32)
    session = ort.InferenceSession(str(MODEL_REPOSITORY / MODEL / "1" / "model.onnx"))
    return session.run(["probabilities"], {"features": features})[0]


def run_infer(server, manifest: Manifest, **options: object):
    """The infer operator on chunk 0, as a mapped task runs it; returns the output part, by row id."""
    operator = TritonInferenceOperator(
        task_id="infer",
        chunk=manifest.chunks[0].to_dict(),
        model_name=MODEL,
        inputs={"features": INPUTS},
        server=server.to_dict(),
        **options,
    )
    result = operator.execute({})
    assert (result["rows_out"], result["rows_rejected"]) == (ROWS, 0)
    return pq.read_table(result["output_path"]).sort_by("row_id")


def test_a_width_two_output_lands_as_two_named_columns(classifier_server, manifest) -> None:
    outputs = run_infer(classifier_server, manifest, outputs={"probabilities": ["p_benign", "p_malignant"]})

    assert outputs.column_names == ["row_id", "p_benign", "p_malignant"]
    expected = reference()
    np.testing.assert_allclose(outputs["p_benign"].to_numpy(), expected[:, 0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(outputs["p_malignant"].to_numpy(), expected[:, 1], atol=1e-6, rtol=0)
    assert str(outputs.schema.field("p_malignant").type) == "float"


def test_chosen_values_only_and_every_other_input_column_passed_through(classifier_server, manifest) -> None:
    outputs = run_infer(
        classifier_server, manifest, outputs={"probabilities": {1: "p_malignant"}}, passthrough_columns="*"
    )

    not_inputs = ["transaction_id", "customer_id", "amount", *FEATURES[8:]]
    assert outputs.column_names == ["row_id", *not_inputs, "p_malignant"]
    source = pq.read_table(INPUT_DIR["path"] / "part-000.parquet")
    for column in not_inputs:
        assert outputs[column].to_pylist() == source[column].to_pylist(), column
    np.testing.assert_allclose(outputs["p_malignant"].to_numpy(), reference()[:, 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_top_k_labels_from_the_models_labels_file(classifier_server, manifest, top_k: int) -> None:
    outputs = run_infer(classifier_server, manifest, top_k=top_k)

    expected = reference()
    order = np.argsort(-expected, axis=1, kind="stable")
    if top_k == 1:
        assert outputs.column_names == ["row_id", "label", "label_score"]
        assert outputs["label"].to_pylist() == [LABELS[i] for i in order[:, 0]]
        # Triton writes scores as text with six decimals.
        np.testing.assert_allclose(outputs["label_score"].to_numpy(), expected.max(axis=1), atol=1e-6)
    else:
        assert outputs.column_names == ["row_id", "label_1", "label_2", "label_score_1", "label_score_2"]
        assert outputs["label_2"].to_pylist() == [LABELS[i] for i in order[:, 1]]
        np.testing.assert_allclose(outputs["label_score_2"].to_numpy(), expected.min(axis=1), atol=1e-6)
    assert set(outputs[outputs.column_names[1]].to_pylist()) == set(LABELS)  # both classes occur


def test_postprocess_in_pandas_thresholds_and_maps_labels(classifier_server, manifest) -> None:
    def decide(frame):
        frame["decision"] = np.where(frame["p_malignant"] > 0.5, "refer", "clear")
        return frame.drop(columns=["p_benign"])

    outputs = run_infer(
        classifier_server,
        manifest,
        outputs={"probabilities": ["p_benign", "p_malignant"]},
        postprocess=decide,
    )

    assert outputs.column_names == ["row_id", "p_malignant", "decision"]
    expected = np.where(reference()[:, 1] > 0.5, "refer", "clear").tolist()
    assert outputs["decision"].to_pylist() == expected
    assert {"refer", "clear"} == set(expected)


def test_a_failing_postprocess_fails_the_task_for_good_naming_the_chunk(classifier_server, manifest) -> None:
    def broken(frame):
        return frame["no_such_column"]

    with pytest.raises(
        AirflowFailException, match=r"postprocess on chunk 0 \(rows with row_id 0…4999\) failed: KeyError"
    ):
        run_infer(classifier_server, manifest, postprocess=broken)

    with pytest.raises(AirflowFailException, match="returned 10 rows for 5000: it must keep every row"):
        run_infer(classifier_server, manifest, postprocess=lambda frame: frame.head(10))


def test_widths_are_checked_against_the_model_before_any_row_is_sent(classifier_server) -> None:
    hook = TritonHook(url=classifier_server.grpc_url)
    metadata, config = hook.get_model_metadata(MODEL), hook.get_model_config(MODEL)
    batch = config["max_batch_size"]

    with pytest.raises(
        ContractError, match=r"'probabilities' of model 'tumor_classifier' holds 2 value\(s\) a row"
    ):
        bind_outputs({"probabilities": ["a", "b", "c"]}, metadata, batch)
    with pytest.raises(ContractError, match=r"no value at position\(s\) \[2\]"):
        bind_outputs({"probabilities": {2: "p_third"}}, metadata, batch)
    with pytest.raises(ContractError, match="asked for both as values"):
        bind_outputs({"probabilities": "p"}, metadata, batch, top_k=1, labelled_outputs=["probabilities"])
    scorer = hook.get_model_metadata("risk_scorer")
    # The case of the issue: two names for a width-1 output failed inside pyarrow, after the server started.
    with pytest.raises(ContractError, match=r"'probability' of model 'risk_scorer' holds 1 value\(s\)"):
        bind_outputs({"probability": ["a", "b"]}, scorer, 1024)
    with pytest.raises(ContractError, match="no output of model 'risk_scorer' names a label_filename"):
        bind_outputs(None, scorer, 1024, top_k=1, labelled_outputs=[])
    hook.close()


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"probabilities": [1, 2]}, "must be a column name, a list of column names"),
        ({"probabilities": {"first": "p"}}, "keys are value positions"),
        ({"probabilities": ["p", "q"], "other": "p"}, "Output column 'p' is named twice"),
        ({"probabilities": {}}, "picks no values"),
    ],
)
def test_the_outputs_mapping_is_checked_when_the_dag_is_parsed(outputs, message: str) -> None:
    from airflow.sdk import DAG

    from airflow_batch_infer.task_group import batch_inference

    with pytest.raises(ContractError, match=message):
        TritonInferenceOperator(task_id="infer", chunk={}, model_name=MODEL, inputs={}, outputs=outputs)
    with pytest.raises(ContractError, match=message), DAG(dag_id="parse_outputs", schedule=None):
        batch_inference(
            source="/data/in",
            model_name=MODEL,
            model_repository=MODEL_REPOSITORY,
            inputs={"features": INPUTS},
            table="scores",
            outputs=outputs,
        )
