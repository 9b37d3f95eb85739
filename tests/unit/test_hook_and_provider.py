"""Provider registration and the TritonHook's connection handling."""

from __future__ import annotations

import json

import pytest

from airflow_batch_infer.hooks.triton import TritonHook


def test_the_provider_registers_the_triton_connection_type() -> None:
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    manager = ProvidersManagerTaskRuntime()
    assert "airflow-provider-batch-infer" in manager.providers
    assert manager.hooks["triton"].hook_class_name == "airflow_batch_infer.hooks.triton.TritonHook"


def test_endpoint_tls_and_headers_come_from_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_TRITON_PROD",
        json.dumps(
            {
                "conn_type": "triton",
                "host": "triton.internal",
                "port": 8443,
                "extra": {
                    "ssl": True,
                    "root_certificates": "/etc/ssl/ca.pem",
                    "headers": {"authorization": "Bearer s3cret"},
                    "max_message_mb": 64,
                },
            }
        ),
    )
    hook = TritonHook("triton_prod")
    assert hook.url == "triton.internal:8443"
    assert hook.headers == {"authorization": "Bearer s3cret"}
    assert hook._tls_kwargs()["root_certificates"] == "/etc/ssl/ca.pem"
    assert ("grpc.max_send_message_length", 64 * 1024 * 1024) in hook.channel_args()


def test_an_explicit_endpoint_needs_no_connection() -> None:
    hook = TritonHook("no_such_connection", url="127.0.0.1:8001")
    assert hook.url == "127.0.0.1:8001"
    assert hook.headers is None
    assert hook._tls_kwargs() == {}


def test_a_connection_without_host_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_TRITON_EMPTY", json.dumps({"conn_type": "triton"}))
    with pytest.raises(ValueError, match="has no host"):
        _ = TritonHook("triton_empty").url


def test_header_values_are_masked_in_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Airflow's secrets masker learns the connection's extra when the hook reads it: a token in a
    header never reaches a task log in clear."""
    from airflow.sdk._shared.secrets_masker import redact

    monkeypatch.setenv(
        "AIRFLOW_CONN_TRITON_AUTH",
        json.dumps({"conn_type": "triton", "host": "h", "extra": {"headers": {"x-api-key": "abc123xyz"}}}),
    )
    assert TritonHook("triton_auth").headers == {"x-api-key": "abc123xyz"}
    assert redact("calling with key abc123xyz") == "calling with key ***"
