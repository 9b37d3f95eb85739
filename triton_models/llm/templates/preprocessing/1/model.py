"""Preprocessing step of the TensorRT-LLM ensemble: prompts to token ids with the model's own tokenizer.

Runs in NVIDIA's ``tritonserver:<yy.mm>-trtllm-python-py3`` image, which has ``transformers``. The
tokenizer is read from the ``tokenizer_dir`` parameter (a Hugging Face model folder). Stop and bad words
become TensorRT-LLM word lists: per row, ``[2, n]`` with the words' token ids one after another in the
first line and the offset where each word ends in the second (padded with -1).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


def _parameter(config, key, default=""):
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.add_special_tokens = _parameter(config, "add_special_tokens", "true").lower() == "true"
        self.tokenizer = AutoTokenizer.from_pretrained(_parameter(config, "tokenizer_dir"), legacy=False)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._run(request)))
            except ValueError as error:
                failure = pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=failure))
        return responses

    def _run(self, request):
        queries = [_text(q) for q in _input(request, "QUERY").reshape(-1)]
        rows = len(queries)
        ids = [self.tokenizer.encode(q, add_special_tokens=self.add_special_tokens) for q in queries]
        input_ids = np.full((rows, max(1, *(len(i) for i in ids))), self.pad_id, dtype=np.int32)
        for row, row_ids in enumerate(ids):
            input_ids[row, : len(row_ids)] = row_ids
        output_len = _input(request, "REQUEST_OUTPUT_LEN")
        if output_len is None or (output_len < 1).any():
            raise ValueError("max_tokens must be given and at least 1")
        tensors = {
            "INPUT_ID": input_ids,
            "REQUEST_INPUT_LEN": np.array([[len(i)] for i in ids], dtype=np.int32),
            "REQUEST_OUTPUT_LEN": output_len.astype(np.int32).reshape(rows, 1),
            "BAD_WORDS_IDS": self._word_lists(_input(request, "BAD_WORDS_DICT"), rows),
            "STOP_WORDS_IDS": self._word_lists(_input(request, "STOP_WORDS_DICT"), rows),
            "OUT_END_ID": self._ids(_input(request, "END_ID"), self.end_id, rows),
            "OUT_PAD_ID": self._ids(_input(request, "PAD_ID"), self.pad_id, rows),
        }
        return [pb_utils.Tensor(name, value) for name, value in tensors.items()]

    @staticmethod
    def _ids(given, default, rows):
        if given is not None:
            return given.astype(np.int32).reshape(rows, 1)
        return np.full((rows, 1), default, dtype=np.int32)

    def _word_lists(self, words, rows):
        flat, ends = [], []
        for row in range(rows):
            row_ids, row_ends = [], []
            for word in [] if words is None else words[row].reshape(-1):
                token_ids = self.tokenizer.encode(_text(word), add_special_tokens=False)
                if token_ids:
                    row_ids += token_ids
                    row_ends.append(len(row_ids))
            flat.append(row_ids)
            ends.append(row_ends)
        lists = np.zeros((rows, 2, max(1, *(len(f) for f in flat))), dtype=np.int32)
        lists[:, 1, :] = -1
        for row in range(rows):
            lists[row, 0, : len(flat[row])] = flat[row]
            lists[row, 1, : len(ends[row])] = ends[row]
        return lists
