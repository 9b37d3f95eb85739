"""Generic Triton Python-backend model that serves a ``model.onnx`` with onnxruntime.

The local runtime copies this file as ``<model>/<version>/model.py`` next to the ONNX file when a model's
config names the ``onnxruntime`` backend, which the tritonserver build in ``nvidia-pytriton`` lacks. It runs
inside the server environment (numpy<2, onnxruntime), so it imports nothing from the project.

Model config parameters read: ``onnx_model_filename`` (default ``model.onnx``) and ``onnx_intra_op_threads``
(default 1).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


class _BadRequest(Exception):
    """A request whose tensors cannot be run; answered with an error for that request only."""


class TritonPythonModel:
    """Runs the model's ONNX file with onnxruntime on CPU; one session run per batch of requests."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        filename = params.get("onnx_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.exists(path):
            raise pb_utils.TritonModelException(f"{config['name']}: ONNX file {path} does not exist")

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("onnx_intra_op_threads") or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])

        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config.get("input", [])
        ]
        self.outputs = [
            (t["name"], pb_utils.triton_string_to_numpy(t["data_type"]), [int(d) for d in t.get("dims", [])])
            for t in config.get("output", [])
        ]
        onnx_inputs = {i.name: _ORT_TYPES.get(i.type) for i in self.session.get_inputs()}
        onnx_outputs = {o.name for o in self.session.get_outputs()}
        names = [name for name, _ in self.inputs]
        if sorted(names) != sorted(onnx_inputs):
            raise pb_utils.TritonModelException(
                f"{config['name']}: config inputs {names} differ from the ONNX model's {sorted(onnx_inputs)}"
            )
        unknown = [name for name, _, _ in self.outputs if name not in onnx_outputs]
        if unknown:
            raise pb_utils.TritonModelException(
                f"{config['name']}: config outputs {unknown} are not among the ONNX model's "
                f"{sorted(onnx_outputs)}"
            )
        self.feed_types = onnx_inputs
        self.output_names = [name for name, _, _ in self.outputs]

    def _read(self, request) -> dict:
        arrays = {}
        for name, _ in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise _BadRequest(f"input {name!r} is missing")
            array = tensor.as_numpy()
            onnx_type = self.feed_types.get(name)
            if onnx_type is np.object_:
                array = np.array(
                    [v.decode("utf-8") if isinstance(v, bytes) else v for v in array.ravel()], dtype=object
                ).reshape(array.shape)
            elif onnx_type is not None and array.dtype != onnx_type:
                array = array.astype(onnx_type)
            if self.batching and array.ndim == 0:
                raise _BadRequest(f"input {name!r} has no batch dimension")
            arrays[name] = array
        if self.batching:
            rows = {a.shape[0] for a in arrays.values()}
            if len(rows) > 1:
                raise _BadRequest(f"inputs have different batch sizes {sorted(rows)}")
        return arrays

    def _run(self, feeds: list) -> list:
        """Run the session once on the concatenated ``feeds``; return each request's output arrays."""
        if len(feeds) == 1:
            feed = feeds[0]
        else:
            feed = {name: np.concatenate([f[name] for f in feeds], axis=0) for name, _ in self.inputs}
        results = self.session.run(self.output_names, feed)
        sizes = [next(iter(f.values())).shape[0] for f in feeds] if self.batching else [None]
        total = sum(sizes) if self.batching else None
        per_output = []
        for (name, dtype, dims), result in zip(self.outputs, results, strict=True):
            array = np.asarray(result)
            if array.dtype != dtype:
                array = array.astype(dtype)
            if self.batching:
                if array.ndim == 0 or array.shape[0] != total:
                    raise _BadRequest(f"output {name!r} has shape {array.shape}, expected {total} rows")
                if dims and -1 not in dims and list(array.shape[1:]) != dims:
                    array = array.reshape([total, *dims])
                per_output.append(np.split(array, np.cumsum(sizes)[:-1], axis=0))
            else:
                per_output.append([array])
        return [list(parts) for parts in zip(*per_output, strict=True)]

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict = {}
        for i, request in enumerate(requests):
            try:
                feed = self._read(request)
            except Exception as exc:
                responses[i] = _error(exc)
                continue
            # Requests are concatenated only when every input agrees beyond the batch dimension.
            key = (
                tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(feed.items())) if self.batching else i
            )
            groups.setdefault(key, []).append((i, feed))

        for members in groups.values():
            if len(members) > 1:
                try:
                    outputs = self._run([feed for _, feed in members])
                except Exception:
                    outputs = None  # find the bad request(s): run each one alone below.
                if outputs is not None:
                    for (i, _), arrays in zip(members, outputs, strict=True):
                        responses[i] = self._response(arrays)
                    continue
            for i, feed in members:
                responses[i] = self._respond_one(feed)
        return responses

    def _respond_one(self, feed: dict):
        try:
            return self._response(self._run([feed])[0])
        except Exception as exc:
            return _error(exc)

    def _response(self, arrays: list):
        tensors = [
            pb_utils.Tensor(name, array) for (name, _, _), array in zip(self.outputs, arrays, strict=True)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self.session = None


def _error(exc: Exception):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"onnxruntime: {exc}"))
