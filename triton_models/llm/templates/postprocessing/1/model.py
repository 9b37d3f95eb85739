"""Postprocessing step of the TensorRT-LLM ensemble: generated token ids to text, one string per beam.

Runs in NVIDIA's ``tritonserver:<yy.mm>-trtllm-python-py3`` image, which has ``transformers``. The
tokenizer is read from the ``tokenizer_dir`` parameter. With ``exclude_input_in_output`` the engine returns
the generated tokens only, so the text is the completion without the prompt.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


def _parameter(config, key, default=""):
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.skip_special_tokens = _parameter(config, "skip_special_tokens", "true").lower() == "true"
        self.tokenizer = AutoTokenizer.from_pretrained(_parameter(config, "tokenizer_dir"), legacy=False)

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            texts = np.empty(lengths.shape, dtype=np.object_)  # [rows, beams]
            for row, beam in np.ndindex(*lengths.shape):
                ids = tokens[row, beam, : lengths[row, beam]]
                text = self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
                texts[row, beam] = text.encode("utf-8")
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", texts)]))
        return responses
