"""The docker runtime's lifetime checks against a real Docker Engine and NVIDIA's image, where there are both.

Skipped, with the reason, on a machine without a Docker Engine (this one), without the NVIDIA Container
Toolkit (``risk_scorer``'s instances are ``KIND_GPU``) or without the image already pulled (it is tens of
GB: pull it once, ``docker pull nvcr.io/nvidia/tritonserver:25.10-py3``).
"""

from __future__ import annotations

import time

import pytest

from airflow_batch_infer.operators.reaper import select_orphans
from airflow_batch_infer.runtimes import ServerOwner, get_runtime
from airflow_batch_infer.runtimes.containers import TRITON_IMAGE
from airflow_batch_infer.runtimes.docker_specs import DEFAULT_DOCKER_URL
from airflow_batch_infer.runtimes.labels import LEASE_TIMEOUT_KEY
from tests.conftest import MODEL_REPOSITORY

pytestmark = pytest.mark.integration

OWNER = ServerOwner("nightly", "manual__2026-11-21T00:00:00+00:00", "batch_inference.start_server")


@pytest.fixture(scope="module")
def engine():
    try:
        import docker

        client = docker.APIClient(base_url=DEFAULT_DOCKER_URL, timeout=10)
        client.ping()
    except Exception as exc:
        pytest.skip(f"no Docker Engine at {DEFAULT_DOCKER_URL}: {exc}")
    if "nvidia" not in (client.info().get("Runtimes") or {}):
        pytest.skip("this Docker host has no NVIDIA Container Toolkit (risk_scorer runs on a GPU)")
    try:
        client.inspect_image(TRITON_IMAGE)
    except Exception:
        pytest.skip(f"{TRITON_IMAGE} is not pulled on this Docker host (tens of GB; pull it once)")
    return client


@pytest.fixture
def runtime(engine):
    return get_runtime("docker", gpus=1, pull="never", startup_timeout=300, lease_timeout=600)


def test_a_container_is_closed_labelled_reattached_and_reaped(engine, runtime) -> None:
    info = runtime.start(str(MODEL_REPOSITORY), ["risk_scorer"], owner=OWNER)
    try:
        details = engine.inspect_container(info.handle["container_id"])
        assert details["Config"]["Labels"][LEASE_TIMEOUT_KEY] == "600"
        bindings = details["HostConfig"]["PortBindings"]
        assert {b["HostIp"] for port in bindings.values() for b in port} == {"127.0.0.1"}
        assert not [e for e in details["Config"]["Env"] or [] if e.startswith("AWS_SECRET_ACCESS_KEY=")]

        # A retried start task finds this container, ready, instead of starting a second one.
        found = runtime.find_server(OWNER, ["risk_scorer"])
        assert found is not None
        assert found.handle["container_id"] == info.handle["container_id"]
        assert len(runtime.list_servers()) == 1

        # The reaper leaves it while its run runs, stops it once the run failed.
        [listed] = runtime.list_servers()
        assert select_orphans([listed], lambda d, r: "running", now=time.time(), min_age=0) == []
        [(orphan, reason)] = select_orphans([listed], lambda d, r: "failed", now=time.time(), min_age=0)
        assert reason.endswith("(failed)")
        assert runtime.stop(orphan) is True
        assert runtime.list_servers() == []
    finally:
        runtime.stop(info)
