"""Scores a row as sigmoid(sum of its features); refuses requests with a first feature above 100."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            features = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            if (features[:, 0] > 100).any():
                error = pb_utils.TritonError(
                    "feature 0 is out of range (> 100)", pb_utils.TritonError.INVALID_ARG
                )
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            score = 1.0 / (1.0 + np.exp(-features.sum(axis=1, keepdims=True)))
            responses.append(
                pb_utils.InferenceResponse([pb_utils.Tensor("probability", score.astype(np.float32))])
            )
        return responses
