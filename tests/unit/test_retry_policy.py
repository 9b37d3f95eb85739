"""Which Triton errors are retried: faults of the moment, not bad rows, not a missing restricted-API key."""

from __future__ import annotations

from tritonclient.utils import InferenceServerException

from airflow_batch_infer.client.retry import is_bad_input, is_transient


def test_a_missing_restricted_api_key_is_not_retried_though_triton_answers_unavailable() -> None:
    away = InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")
    keyless = InferenceServerException(
        "This protocol is restricted, expecting header 'triton-grpc-protocol-batch-infer-key'",
        status="StatusCode.UNAVAILABLE",
    )
    bad_row = InferenceServerException("expected [-1,16], got [2,15]", status="StatusCode.INVALID_ARGUMENT")

    assert is_transient(away)
    assert not is_transient(keyless)
    assert not is_transient(bad_row)
    assert is_bad_input(bad_row)
    assert not is_transient(ValueError("not a Triton error"))
