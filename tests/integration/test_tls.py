"""gRPC over TLS with a CA and client certificates: a real tritonserver requiring mutual TLS, reached
through a ``triton`` connection whose extra names the PEM files. Certificates are made by the test."""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from airflow_batch_infer.hooks.triton import TritonHook
from airflow_batch_infer.runtimes import get_runtime
from tests.conftest import MODEL_REPOSITORY

pytestmark = pytest.mark.integration


def _issue(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(folder: Path, name: str, cert, key) -> tuple[str, str]:
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test CA", ca_key, None, None, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert, _ = _write(folder, "ca", ca, ca_key)
    server_cert, server_key_path = _write(
        folder, "server", _issue("localhost", server_key, ca.subject, ca_key, server=True), server_key
    )
    client_cert, client_key_path = _write(
        folder, "client", _issue("airflow", client_key, ca.subject, ca_key), client_key
    )
    return {
        "ca": ca_cert,
        "server_cert": server_cert,
        "server_key": server_key_path,
        "client_cert": client_cert,
        "client_key": client_key_path,
    }


@pytest.fixture(scope="module")
def tls_server(certificates, tmp_path_factory):
    runtime = get_runtime(
        "local",
        work_root=str(tmp_path_factory.mktemp("servers")),
        grpc_tls={
            "server_cert": certificates["server_cert"],
            "server_key": certificates["server_key"],
            "root_cert": certificates["ca"],
        },
    )
    info = runtime.start(str(MODEL_REPOSITORY), ["risk_scorer"])
    yield info
    runtime.stop(info)


def score(hook: TritonHook) -> np.ndarray:
    features = np.ones((8, 16), dtype=np.float32)
    item = InferInput("features", [8, 16], "FP32")
    item.set_data_from_numpy(features)
    return hook.get_conn().infer("risk_scorer", [item]).as_numpy("probability")


def connection(monkeypatch, name: str, extra: dict) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{name.upper()}", json.dumps({"conn_type": "triton", "extra": extra}))


def test_mutual_tls_with_the_connections_certificates(tls_server, certificates, monkeypatch) -> None:
    connection(
        monkeypatch,
        "triton_tls",
        {
            "ssl": True,
            "root_certificates": certificates["ca"],
            "private_key": certificates["client_key"],
            "certificate_chain": certificates["client_cert"],
        },
    )
    hook = TritonHook("triton_tls", url=tls_server.grpc_url)
    assert score(hook).shape == (8, 1)
    assert hook.get_model_metadata("risk_scorer")["name"] == "risk_scorer"


def test_without_a_client_certificate_or_without_tls_the_server_refuses(
    tls_server, certificates, monkeypatch
) -> None:
    connection(monkeypatch, "triton_ca_only", {"ssl": True, "root_certificates": certificates["ca"]})
    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        score(TritonHook("triton_ca_only", url=tls_server.grpc_url))
    assert not TritonHook("no_connection", url=tls_server.grpc_url).is_server_ready()
