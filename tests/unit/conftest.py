"""Fixtures shared by the unit tests."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.fake_apis import FakeKubernetes


@pytest.fixture
def kube(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubernetes]:
    """A Kubernetes API stand-in, reached through the connection ``kube_test`` (namespace ``ml``)."""
    with FakeKubernetes().running() as fake:
        conn = {"conn_type": "kubernetes", "extra": {"kube_config": fake.kube_config(), "namespace": "ml"}}
        monkeypatch.setenv("AIRFLOW_CONN_KUBE_TEST", json.dumps(conn))
        yield fake
