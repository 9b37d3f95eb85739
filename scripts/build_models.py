"""Build the ONNX models of ``triton_models/`` from fixed seeds.

Each model is a small multi-layer perceptron with a sigmoid head, written with ``onnx.helper`` so that
the same seed always gives the same bytes. Run ``make models`` after changing a definition here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
# Opset 17 / IR 8 load in every onnxruntime that Triton containers of the last two years ship.
OPSET = 17
IR_VERSION = 8


@dataclass(frozen=True)
class MlpSpec:
    """A scoring network: ``features`` FP32 [batch, n_features] → ``probability`` FP32 [batch, 1]."""

    name: str
    layers: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class ClassifierSpec:
    """A classifier: ``features`` FP32 [batch, n_features] → ``probabilities`` FP32 [batch, n_classes]
    (softmax), with its class names in ``labels.txt`` (the config's ``label_filename``)."""

    name: str
    layers: tuple[int, ...]
    labels: tuple[str, ...]
    seed: int


MODELS = (
    MlpSpec(name="risk_scorer", layers=(16, 32, 1), seed=20261121),
    MlpSpec(name="risk_scorer_heavy", layers=(16, 512, 512, 1), seed=20261122),
)
CLASSIFIERS = (
    ClassifierSpec(name="tumor_classifier", layers=(8, 16, 2), labels=("benign", "malignant"), seed=20261206),
)


def build_mlp(spec: MlpSpec | ClassifierSpec) -> onnx.ModelProto:
    """Return the ONNX graph of ``spec``: Gemm + Relu per hidden layer, Gemm + Sigmoid at the head (Softmax
    over the classes for a classifier).

    :param spec: layer widths and seed of the network.
    """
    classifier = isinstance(spec, ClassifierSpec)
    head, output = ("Softmax", "probabilities") if classifier else ("Sigmoid", "probability")
    rng = np.random.default_rng(spec.seed)
    nodes, initializers = [], []
    current = "features"
    pairs = list(zip(spec.layers[:-1], spec.layers[1:], strict=True))
    for i, (fan_in, fan_out) in enumerate(pairs):
        weight = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        initializers += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out]))
        last = i == len(pairs) - 1
        act = f"a{i}" if not last else output
        nodes.append(helper.make_node(head if last else "Relu", [out], [act]))
        current = act
    graph = helper.make_graph(
        nodes,
        spec.name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", spec.layers[0]])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", spec.layers[-1]])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="airflow-batch-infer"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", type=Path, default=ROOT / "triton_models")
    args = parser.parse_args()
    for spec in MODELS:
        target = args.repository / spec.name / "1" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(build_mlp(spec).SerializeToString())
        print(f"wrote {target} ({target.stat().st_size} bytes)")
    for spec in CLASSIFIERS:
        target = args.repository / spec.name / "1" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(build_mlp(spec).SerializeToString())
        (args.repository / spec.name / "labels.txt").write_text("\n".join(spec.labels) + "\n")
        print(f"wrote {target} ({target.stat().st_size} bytes) and its labels.txt")


if __name__ == "__main__":
    main()
