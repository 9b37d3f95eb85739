"""A deterministic, CPU-only stand-in for the TensorRT-LLM ensemble (same tensors, Python backend).

Tokens are whitespace-separated words. For each row the "generated" text is ``"summary: "`` followed by the
first words of the prompt, as a greedy model that copies its input would write them:

- at most ``max_tokens`` words; words listed in ``bad_words`` are never generated;
- a word listed in ``stop_words`` ends the text (it is not included) once ``min_tokens`` words are out;
- ``exclude_input_in_output`` false puts the prompt in front of the text, as the real backend does;
- ``num_input_tokens`` is the prompt's word count and ``num_output_tokens`` the words generated; like the
  real backend, they are returned only when ``return_num_input_tokens``/``return_num_output_tokens`` are
  true (asking for them without the flag is refused, so a client that forgets the flag fails here too);
- sampling parameters (temperature, top_p, top_k, seed, penalties) are accepted and do not change the text.

A prompt of more than ``max_input_len`` words (a model parameter, like an engine's ``max_input_len``)
fails its request with INVALID_ARGUMENT and a message naming the count; the other requests go on.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

PREFIX = "summary: "


class Refused(ValueError):
    """The request is bad input: answered with INVALID_ARGUMENT and this message."""


def _tensor(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _scalar(values, row, default):
    return default if values is None else values[row].reshape(-1)[0].item()


def _words(values, row):
    if values is None:
        return set()
    return {w.decode("utf-8") if isinstance(w, bytes) else str(w) for w in values[row].reshape(-1)}


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def generate(prompt, max_tokens, min_tokens, stop_words, bad_words):
    """The words this model generates for ``prompt``."""
    kept = []
    for word in prompt.split():
        if len(kept) >= max_tokens:
            break
        if word in stop_words and len(kept) >= min_tokens:
            break
        if word in bad_words:
            continue
        kept.append(word)
    return kept


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.max_input_len = int(config["parameters"]["max_input_len"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tensors = self._run(request)
            except Refused as refused:
                error = pb_utils.TritonError(str(refused), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def _run(self, request):
        prompts = _tensor(request, "text_input")
        max_tokens = _tensor(request, "max_tokens")
        optional = {
            name: _tensor(request, name)
            for name in (
                "stop_words",
                "bad_words",
                "min_tokens",
                "beam_width",
                "stream",
                "exclude_input_in_output",
                "return_num_input_tokens",
                "return_num_output_tokens",
            )
        }
        texts, n_in, n_out = [], [], []
        for row in range(prompts.shape[0]):
            prompt = _text(prompts[row].reshape(-1)[0])
            words = len(prompt.split())
            if words > self.max_input_len:
                raise Refused(f"prompt has {words} tokens, more than max_input_len {self.max_input_len}")
            limit = int(max_tokens[row].reshape(-1)[0])
            if limit < 1:
                raise Refused(f"max_tokens must be at least 1, got {limit}")
            if _scalar(optional["beam_width"], row, 1) != 1:
                raise Refused("beam_width must be 1: the engine was built with max_beam_width 1")
            if _scalar(optional["stream"], row, False):
                raise Refused("streaming needs a decoupled model; this one answers unary requests")
            kept = generate(
                prompt,
                limit,
                int(_scalar(optional["min_tokens"], row, 0)),
                _words(optional["stop_words"], row),
                _words(optional["bad_words"], row),
            )
            text = PREFIX + " ".join(kept)
            if not _scalar(optional["exclude_input_in_output"], row, True):
                text = f"{prompt} {text}"
            texts.append(text.encode("utf-8"))
            n_in.append(words)
            n_out.append(len(kept))

        rows = len(texts)
        wanted = set(request.requested_output_names())
        for output, flag in (
            ("num_input_tokens", "return_num_input_tokens"),
            ("num_output_tokens", "return_num_output_tokens"),
        ):
            if output in wanted and not all(_scalar(optional[flag], r, False) for r in range(rows)):
                raise Refused(f"{output} is returned only when {flag} is true")
        longest = max([1, *n_out])
        outputs = {
            "text_output": np.array(texts, dtype=np.object_).reshape(rows, 1),
            "cum_log_probs": np.zeros((rows, 1), dtype=np.float32),
            "output_log_probs": np.zeros((rows, 1, longest), dtype=np.float32),
            "batch_index": np.zeros((rows, 1), dtype=np.int32),
            "sequence_index": np.zeros((rows, 1), dtype=np.int32),
            "num_input_tokens": np.array(n_in, dtype=np.int32).reshape(rows, 1),
            "num_output_tokens": np.array(n_out, dtype=np.int32).reshape(rows, 1),
        }
        return [pb_utils.Tensor(name, value) for name, value in outputs.items() if name in wanted]
