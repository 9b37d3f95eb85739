"""Leases of container servers, through the platforms' own APIs (small HTTP stand-ins of the Docker Engine
and the Kubernetes API, tests/fake_apis.py): what each records, what a renewal changes, what the reaper reads.
"""

from __future__ import annotations

import json
import time

import pytest

from airflow_batch_infer.operators.reaper import select_orphans
from airflow_batch_infer.runtimes import ServerInfo, ServerOwner, get_runtime
from airflow_batch_infer.runtimes.container_keeper import LEASE_FILE, POD_ANNOTATIONS_FILE
from airflow_batch_infer.runtimes.containers import TRITON_IMAGE
from airflow_batch_infer.runtimes.labels import LEASE_RENEWED_KEY, LEASE_TIMEOUT_KEY
from airflow_batch_infer.runtimes.lease import renew
from tests.fake_apis import FakeDockerEngine, FakeKubernetes

OWNER = ServerOwner("nightly", "manual__2026-11-21T00:00:00+00:00", "batch_inference.start_server")


def test_a_pod_has_a_hard_deadline_and_a_lease_its_run_renews(kube: FakeKubernetes) -> None:
    options = {"kubernetes_conn_id": "kube_test", "model_repository": "s3://m/prod", "lease_timeout": 600}
    runtime = get_runtime("kubernetes", **options)
    info = runtime.launch("/models", ["risk_scorer"], owner=OWNER)
    pod = kube.pods[("ml", info.handle["server_id"])]
    assert pod["spec"]["activeDeadlineSeconds"] == 86400  # Kubernetes kills it whatever Airflow does
    assert pod["spec"]["automountServiceAccountToken"] is False  # no token for a model's code to read
    assert pod["metadata"]["annotations"][LEASE_TIMEOUT_KEY] == "600"
    # Its keeper reads the renewal annotation from a downward-API file and stops the server without it.
    [container] = pod["spec"]["containers"]
    assert container["command"][:2] == ["/bin/sh", "-c"]
    assert "tritonserver" in container["command"]
    assert {"name": "BATCH_INFER_LEASE_FILE", "value": POD_ANNOTATIONS_FILE} in container["env"]
    [downward] = [v for v in pod["spec"]["volumes"] if v["name"] == "pod-annotations"]
    assert downward["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == "metadata.annotations"
    launched = float(pod["metadata"]["annotations"][LEASE_RENEWED_KEY])

    # An hour passes without a renewal (the annotation is moved back): the reaper would stop it.
    pod["metadata"]["annotations"][LEASE_RENEWED_KEY] = f"{launched - 3600:.0f}"
    [listed] = runtime.list_servers()
    assert listed.handle["lease_timeout"] == 600
    [(_, reason)] = select_orphans([listed], lambda d, r: "running", now=time.time(), min_age=0)
    assert reason.startswith("its lease expired: not renewed for 36")

    # A task renews it (from the start task's XCom and the runtime options): the reaper leaves it.
    assert renew(json.loads(json.dumps(info.to_dict())), options) is True
    assert float(pod["metadata"]["annotations"][LEASE_RENEWED_KEY]) >= launched
    assert select_orphans(runtime.list_servers(), lambda d, r: "running", now=time.time(), min_age=0) == []

    assert runtime.stop(info) is True
    assert renew(info.to_dict(), options) is False  # gone: says so, does not raise


def test_no_deadline_and_no_lease_when_asked(kube: FakeKubernetes) -> None:
    runtime = get_runtime(
        "kubernetes",
        kubernetes_conn_id="kube_test",
        model_repository="s3://models/prod",
        lease_timeout=0,
        active_deadline_seconds=None,
    )
    info = runtime.launch("/models", ["risk_scorer"], owner=OWNER)
    pod = kube.pods[("ml", info.handle["server_id"])]
    assert "activeDeadlineSeconds" not in pod["spec"]
    assert LEASE_TIMEOUT_KEY not in pod["metadata"]["annotations"]
    assert renew(info) is False
    runtime.stop(info)


def test_a_container_keeps_its_lease_in_a_file_its_run_renews_and_its_keeper_reads() -> None:
    with FakeDockerEngine(images=(TRITON_IMAGE,)).running() as engine:
        runtime = get_runtime("docker", docker_url=engine.url, gpus=0, lease_timeout=900)
        info = runtime.launch("/srv/models", ["risk_scorer"], owner=OWNER)
        [(_, _, _, created)] = engine.calls("POST", "/containers/create$")
        assert created["Labels"][LEASE_TIMEOUT_KEY] == "900"
        assert created["HostConfig"]["PortBindings"]["8001/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": ""}]
        # Its first process is the keeper, which stops tritonserver when the lease file grows too old.
        assert created["Cmd"][:2] == ["/bin/sh", "-c"]
        assert "tritonserver" in created["Cmd"]
        assert "BATCH_INFER_LEASE_TIMEOUT=900" in created["Env"]
        assert f"BATCH_INFER_LEASE_FILE={LEASE_FILE}" in created["Env"]

        # Not renewed for two hours (counted from its creation): the reaper would stop it, run or not.
        later = time.time() + 7200
        [listed] = runtime.list_servers()
        [(_, reason)] = select_orphans([listed], lambda d, r: "running", now=later, min_age=0)
        assert reason.startswith("its lease expired")

        # A task renews it: the lease file is copied in, dated now; the reaper reads that date back.
        assert renew(json.loads(json.dumps(info.to_dict())), {"docker_url": engine.url}) is True
        [(_, _, query, _)] = engine.calls("PUT", "/archive$")
        assert query["path"] == "/"
        [listed] = runtime.list_servers()
        assert abs(listed.handle["lease_renewed_at"] - time.time()) < 5
        assert select_orphans([listed], lambda d, r: "running", now=time.time() + 60, min_age=0) == []
        [(_, reason)] = select_orphans([listed], lambda d, r: "failed", now=time.time() + 60, min_age=0)
        assert reason.endswith("is no longer queued or running (failed)")

        runtime.stop(ServerInfo.from_dict(info.to_dict()))
        assert renew(info, {"docker_url": engine.url}) is False  # gone: says so, does not raise


def test_container_servers_close_model_control_and_shared_memory_to_every_client(
    kube: FakeKubernetes,
) -> None:
    with FakeDockerEngine(images=(TRITON_IMAGE,)).running() as engine:
        get_runtime("docker", docker_url=engine.url, gpus=0).launch("/srv/models", ["risk_scorer"])
        [(_, _, _, created)] = engine.calls("POST", "/containers/create$")
    pod_runtime = get_runtime("kubernetes", kubernetes_conn_id="kube_test", model_repository="s3://m/prod")
    info = pod_runtime.launch("/models", ["risk_scorer"], owner=OWNER)
    pod = kube.pods[("ml", info.handle["server_id"])]
    for command in (created["Cmd"], pod["spec"]["containers"][0]["command"]):
        flags = [
            a for a in command if a.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))
        ]
        assert len(flags) == 2
        assert all(
            f.split("=", 1)[1].startswith("model-repository,shared-memory:batch-infer-key=") for f in flags
        )
    # A key nobody is given: it is in no environment, label or annotation, and each server has its own.
    assert not [e for e in created["Env"] if "batch-infer-key" in e]
    assert created["Cmd"][-1] != pod["spec"]["containers"][0]["command"][-1]
    pod_runtime.stop(info)


def test_docker_keeps_aws_keys_out_of_the_containers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import tarfile

    from airflow_batch_infer.runtimes.containers import CREDENTIALS_PATH

    conn = {
        "conn_type": "aws",
        "login": "AKIAEXAMPLEKEY",
        "password": "example-secret-key",
        "extra": {"region_name": "eu-west-1", "endpoint_url": "http://minio:9000"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_MINIO_TEST", json.dumps(conn))
    with FakeDockerEngine(images=(TRITON_IMAGE,)).running() as engine:
        runtime = get_runtime(
            "docker",
            docker_url=engine.url,
            gpus=0,
            model_repository="s3://triton-models/prod",
            aws_conn_id="minio_test",
        )
        info = runtime.launch("/unused", ["risk_scorer"], owner=OWNER)
        [(_, _, _, created)] = engine.calls("POST", "/containers/create$")
        env = "\n".join(created["Env"])
        assert "example-secret-key" not in env  # what `docker inspect` shows, and exited containers keep
        assert "AKIAEXAMPLEKEY" not in env
        assert f"AWS_SHARED_CREDENTIALS_FILE={CREDENTIALS_PATH}" in env
        assert "AWS_DEFAULT_REGION=eu-west-1" in env
        assert "--model-repository=s3://minio:9000/triton-models/prod" in created["Cmd"]

        [(path, archive)] = engine.archives[
            info.handle["container_id"]
        ]  # copied in before the start, removed with the container
        assert path == "/"
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            text = tar.extractfile(CREDENTIALS_PATH.lstrip("/")).read().decode()
        assert "aws_access_key_id = AKIAEXAMPLEKEY" in text
        assert "aws_secret_access_key = example-secret-key" in text
        [start] = engine.calls("POST", "/start$")
        assert engine.requests.index(start) > engine.requests.index(
            next(r for r in engine.requests if r[1].endswith("/archive"))
        )
        assert runtime.stop(info) is True
        assert engine.containers == {}


def test_a_pod_admits_only_the_airflow_pods_on_its_ports(kube: FakeKubernetes) -> None:
    runtime = get_runtime("kubernetes", kubernetes_conn_id="kube_test", model_repository="s3://m/prod")
    info = runtime.launch("/models", ["risk_scorer"], owner=OWNER)
    server_id = info.handle["server_id"]
    policy = kube.network_policies[("ml", server_id)]
    pod = kube.pods[("ml", server_id)]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/instance": server_id}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"tier": "airflow"}}}]
    assert sorted(p["port"] for p in rule["ports"]) == [8000, 8001, 8002]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]
    assert runtime.stop(info) is True
    assert kube.network_policies == {}  # removed with the Pod that owns it

    workers = get_runtime(
        "kubernetes",
        kubernetes_conn_id="kube_test",
        model_repository="s3://m/prod",
        allowed_clients={"app": "batch-workers"},
    ).launch("/models", ["risk_scorer"], owner=OWNER)
    [(_, other)] = kube.network_policies.items()
    assert other["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app": "batch-workers"}}}]
    runtime.stop(workers)

    none = get_runtime(
        "kubernetes", kubernetes_conn_id="kube_test", model_repository="s3://m/prod", allowed_clients={}
    )
    unguarded = none.launch("/models", ["risk_scorer"], owner=OWNER)
    assert kube.network_policies == {}
    none.stop(unguarded)


def test_a_retried_start_finds_its_container_with_its_endpoint() -> None:
    other_try = ServerOwner(OWNER.dag_id, OWNER.run_id, "batch_inference.other_task")
    with FakeDockerEngine(images=(TRITON_IMAGE,)).running() as engine:
        runtime = get_runtime("docker", docker_url=engine.url, gpus=0)
        info = runtime.launch("/srv/models", ["risk_scorer"], owner=OWNER)
        found = runtime.find_server(OWNER, ["risk_scorer"])
        assert found is not None
        assert found.handle["container_id"] == info.handle["container_id"]
        assert found.grpc_url == info.grpc_url  # listed containers carry no URL: refreshed from inspect
        assert runtime.find_server(other_try, ["risk_scorer"]) is None  # another task's server
        runtime.stop(info)
        assert runtime.find_server(OWNER, ["risk_scorer"]) is None


def test_a_pod_reads_s3_keys_from_a_mounted_file_not_its_environment(kube: FakeKubernetes) -> None:
    runtime = get_runtime(
        "kubernetes",
        kubernetes_conn_id="kube_test",
        model_repository="s3://m/prod",
        aws_credentials_secret="triton-s3-credentials",
    )
    info = runtime.launch("/models", ["risk_scorer"], owner=OWNER)
    pod = kube.pods[("ml", info.handle["server_id"])]
    [container] = pod["spec"]["containers"]
    assert "envFrom" not in container  # no Secret spilled into the environment
    assert {"name": "AWS_SHARED_CREDENTIALS_FILE", "value": "/run/airflow-batch-infer/aws-credentials"} in (
        container["env"]
    )
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "aws-credentials"]
    assert (mount["mountPath"], mount["readOnly"]) == ("/run/airflow-batch-infer", True)
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == "aws-credentials"]
    assert volume["secret"]["secretName"] == "triton-s3-credentials"
    assert volume["secret"]["items"] == [{"key": "credentials", "path": "aws-credentials"}]
    runtime.stop(info)
