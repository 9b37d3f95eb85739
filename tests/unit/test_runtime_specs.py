"""The docker and kubernetes runtimes at their boundary: the specs they build, and what they send.

No Docker Engine, Kubernetes API or GPU exists here. The container, Pod and Service specs are pure
functions, checked field by field and validated with the docker SDK's and the kubernetes client's own
models. The runtimes' calls then go through the real ``DockerHook``/docker SDK and ``KubernetesHook``/
kubernetes client to small local HTTP stand-ins for the Engine and the API server (``tests/fake_apis.py``):
the only things faked, because they cannot exist here.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from airflow_batch_infer.runtimes import ServerInfo, ServerOwner, ServerStartError, get_runtime
from airflow_batch_infer.runtimes.containers import TRITON_IMAGE, TRITON_TRTLLM_IMAGE, triton_s3_path
from airflow_batch_infer.runtimes.docker import DockerOptions, build_container_spec
from airflow_batch_infer.runtimes.kubernetes import PodOptions, build_pod, build_service
from airflow_batch_infer.runtimes.labels import (
    DAG_ID_KEY,
    MANAGED_BY,
    MANAGED_BY_KEY,
    RUN_ID_KEY,
    SERVER_ID_KEY,
    k8s_label_value,
)
from tests.fake_apis import FakeDockerEngine, FakeKubernetes

OWNER = ServerOwner(
    "nightly_scoring", "manual__2026-11-21T00:00:00+00:00", "batch_inference.start_server", -1
)
SERVER_ID = "abi-0123456789ab"


# ---------------------------------------------------------------------------- shared


def test_pinned_images_are_ngc_tritonserver_tags() -> None:
    assert TRITON_IMAGE == "nvcr.io/nvidia/tritonserver:25.10-py3"
    assert TRITON_TRTLLM_IMAGE == "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3"


def test_triton_s3_paths() -> None:
    assert triton_s3_path("s3://models/triton") == "s3://models/triton"
    assert triton_s3_path("s3://models/triton", "http://minio:9000") == "s3://minio:9000/models/triton"
    assert triton_s3_path("s3://m/t", "https://s3.example.com") == "s3://https://s3.example.com:443/m/t"


@pytest.mark.parametrize(
    "value",
    [
        "manual__2026-11-21T00:00:00+00:00",
        "scheduled__2026-11-21T00:00:00.123456+00:00",
        "x" * 80,
        "-leading-and-trailing-",
        "asset_triggered__2026-11-21T00:00:00+00:00",
    ],
)
def test_k8s_label_values_are_valid_and_distinct(value: str) -> None:
    from kubernetes.utils import quantity  # noqa: F401 (the client is importable)

    label = k8s_label_value(value)
    assert len(label) <= 63
    assert label[0].isalnum()
    assert label[-1].isalnum()
    assert all(c.isalnum() or c in "-_." for c in label)
    assert k8s_label_value(value + "1") != label
    assert k8s_label_value("risk_scorer.v2") == "risk_scorer.v2"  # valid values are kept as they are


def test_unknown_runtime_and_bad_options_name_what_exists() -> None:
    with pytest.raises(ValueError, match="'local', 'docker', 'kubernetes', 'ecs'"):
        get_runtime("podman")
    with pytest.raises(TypeError, match=r"Bad runtime_options for the 'docker'.*gpu_count"):
        get_runtime("docker", gpu_count=1)


# ---------------------------------------------------------------------------- docker


def container_spec(model_repository: str, models: list[str] | None, owner=None, **options):
    """The docker container of one server, from the runtime's options (no lease unless asked)."""
    docker = DockerOptions(**{"lease_timeout": 0, **options})
    return build_container_spec(docker, docker.describe(SERVER_ID, model_repository, models, owner))


def test_container_spec_field_by_field() -> None:
    from docker.types import ContainerConfig, HostConfig

    spec = container_spec(
        "/srv/triton_models",
        ["risk_scorer"],
        OWNER,
        image=TRITON_IMAGE,
        gpus=2,
        shm_size="2g",
        environment={"CUDA_MODULE_LOADING": "LAZY"},
    )
    create, host = spec.create, spec.host_config
    assert create["image"] == TRITON_IMAGE
    assert create["name"] == SERVER_ID
    assert create["command"][:-2] == [
        "tritonserver",
        "--model-repository=/models",
        f"--id={SERVER_ID}",
        "--http-port=8000",
        "--grpc-port=8001",
        "--metrics-port=8002",
        "--strict-readiness=true",
        "--exit-timeout-secs=30",
        "--log-verbose=0",
        "--model-control-mode=explicit",
        "--load-model=risk_scorer",
    ]
    assert create["command"][-2].startswith("--http-restricted-api=model-repository,shared-memory:")
    assert create["labels"] == {
        MANAGED_BY_KEY: MANAGED_BY,
        "app.kubernetes.io/name": "triton-inference-server",
        SERVER_ID_KEY: SERVER_ID,
        DAG_ID_KEY: "nightly_scoring",
        RUN_ID_KEY: "manual__2026-11-21T00:00:00+00:00",  # docker labels keep the exact value
        "airflow-batch-infer/task-id": "batch_inference.start_server",
        "airflow-batch-infer/map-index": "-1",
        "airflow-batch-infer/replica": "0",
    }
    assert create["ports"] == [8000, 8001, 8002]
    assert create["environment"] == {"CUDA_MODULE_LOADING": "LAZY"}
    assert host["binds"] == ["/srv/triton_models:/models:ro"]
    assert host["shm_size"] == "2g"
    assert host["port_bindings"] == {
        8000: ("127.0.0.1", None),
        8001: ("127.0.0.1", None),
        8002: ("127.0.0.1", None),
    }
    assert host["auto_remove"] is False
    [gpu] = host["device_requests"]
    assert (gpu["Driver"], gpu["Count"], gpu["Capabilities"]) == ("nvidia", 2, [["gpu"]])
    assert [(u["Name"], u["Soft"], u["Hard"]) for u in host["ulimits"]] == [
        ("memlock", -1, -1),
        ("stack", 67108864, 67108864),
    ]

    # The docker SDK's own models accept it, and say what goes to the Engine.
    host_config = HostConfig(version="1.47", **host)
    assert host_config["ShmSize"] == 2 * 1024**3
    assert host_config["PortBindings"]["8001/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": ""}]
    container = ContainerConfig(
        "1.47", **{k: v for k, v in create.items() if k != "name"}, host_config=host_config
    )
    assert container["HostConfig"]["DeviceRequests"][0]["Count"] == 2
    assert set(container["ExposedPorts"]) == {"8000/tcp", "8001/tcp", "8002/tcp"}


def test_container_spec_variants() -> None:
    # All GPUs, a network to join (no published ports), S3 through a compatible store, all models.
    spec = container_spec(
        "s3://triton-models/prod",
        None,
        image=TRITON_TRTLLM_IMAGE,
        gpus="all",
        network="airflow-batch-infer",
        s3_endpoint_url="http://minio:9000",
        extra_args=["--log-info=true"],
    )
    assert spec.host_config["network_mode"] == "airflow-batch-infer"
    assert "port_bindings" not in spec.host_config
    assert spec.host_config["binds"] == []
    assert spec.host_config["device_requests"][0]["Count"] == -1
    assert "--model-repository=s3://minio:9000/triton-models/prod" in spec.create["command"]
    assert not any(a.startswith("--load-model") for a in spec.create["command"])
    assert spec.create["command"][-1] == "--log-info=true"
    # Listed devices, and none at all for a CPU-only server.
    listed = container_spec("/m", None, image=TRITON_IMAGE, gpus=["0", "3"])
    assert listed.host_config["device_requests"][0]["DeviceIDs"] == ["0", "3"]
    cpu = container_spec("/m", None, image=TRITON_IMAGE, gpus=0)
    assert "device_requests" not in cpu.host_config


@pytest.fixture
def engine():
    with FakeDockerEngine(images=(TRITON_IMAGE,)).running() as fake:
        yield fake


def docker_runtime(engine: FakeDockerEngine, **options):
    return get_runtime("docker", docker_url=engine.url, **options)


def test_docker_launch_stop_list_through_the_engine_api(engine: FakeDockerEngine) -> None:
    runtime = docker_runtime(engine, gpus=1, shm_size="1g", advertise_host="gpu-host.internal")
    info = runtime.launch("/srv/triton_models", ["risk_scorer"], owner=OWNER)

    [(_, _, query, body)] = engine.calls("POST", "/containers/create$")
    assert query["name"] == info.handle["server_id"]
    assert body["Image"] == TRITON_IMAGE
    assert body["Labels"][RUN_ID_KEY] == OWNER.run_id
    assert body["HostConfig"]["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": 1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert body["HostConfig"]["ShmSize"] == 1024**3
    assert body["HostConfig"]["Binds"] == ["/srv/triton_models:/models:ro"]
    server_command = body["Cmd"][body["Cmd"].index("tritonserver") :]  # under the lease keeper
    assert server_command[:2] == ["tritonserver", "--model-repository=/models"]
    assert not engine.calls("POST", "/images/create")  # the image was there: no pull

    # The endpoint uses the ports Docker published, on the advertised host.
    assert info.runtime == "docker"
    assert info.grpc_url == "gpu-host.internal:32769"
    assert info.http_url == "http://gpu-host.internal:32768"
    assert info.metrics_url == "http://gpu-host.internal:32770/metrics"
    assert info.handle["owner"] == OWNER.to_dict()
    assert runtime.is_running(info)
    assert runtime.failure_reason(info) is None

    engine.logs[info.handle["container_id"]] = "\n".join(f"line {i}" for i in range(100))
    assert runtime.log_tail(info, 3) == "line 97\nline 98\nline 99"

    [listed] = runtime.list_servers()
    assert listed.handle["container_id"] == info.handle["container_id"]
    assert ServerOwner.from_dict(listed.handle["owner"]) == OWNER

    # Teardown from another worker: a fresh runtime and a JSON round trip of the handle.
    again = ServerInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert docker_runtime(engine).stop(again) is True
    assert engine.containers == {}
    assert docker_runtime(engine).stop(again) is False  # idempotent: already gone
    assert runtime.list_servers() == []


def test_docker_pulls_a_missing_image_and_reports_an_exited_container(engine: FakeDockerEngine) -> None:
    runtime = docker_runtime(engine, image="nvcr.io/nvidia/tritonserver:24.12-py3", network="batch-infer")
    info = runtime.launch("s3://triton-models", None)
    [(_, _, pulled, _)] = engine.calls("POST", "/images/create$")
    assert (pulled["fromImage"], pulled["tag"]) == ("nvcr.io/nvidia/tritonserver", "24.12-py3")
    # On a network, the server is reached by its container name and its own ports.
    assert info.grpc_url == f"{info.handle['server_id']}:8001"

    engine.exit(info.handle["container_id"], 137, oom=True)
    assert runtime.is_running(info) is False
    assert runtime.failure_reason(info) == "its container exited with code 137 (out of memory)"
    assert runtime.stop(info) is False  # had exited: removed all the same, and says so
    assert engine.containers == {}


def test_docker_start_that_fails_removes_its_container(engine: FakeDockerEngine) -> None:
    engine.fail_start = 'could not select device driver "nvidia" with capabilities: [[gpu]]'
    with pytest.raises(ServerStartError, match="NVIDIA Container Toolkit"):
        docker_runtime(engine).launch("/srv/triton_models", ["risk_scorer"])
    assert engine.calls("DELETE", "/containers/")
    assert engine.containers == {}


def test_docker_wait_fails_fast_with_the_log_when_the_container_dies(engine: FakeDockerEngine) -> None:
    runtime = docker_runtime(engine, startup_timeout=30, advertise_host="127.0.0.1")
    info = runtime.launch("/srv/triton_models", ["risk_scorer"])
    cid = info.handle["container_id"]
    engine.logs[cid] = "E1121 model_lifecycle.cc:654] failed to load 'risk_scorer'\nerror: creating server"
    engine.exit(cid, 1)
    started = time.monotonic()
    with pytest.raises(ServerStartError) as caught:
        runtime.wait_ready(info, ["risk_scorer"])
    assert time.monotonic() - started < 10
    assert "exited with code 1" in str(caught.value)
    assert "failed to load 'risk_scorer'" in str(caught.value)


# ---------------------------------------------------------------------------- kubernetes


def pod_dict(**overrides):
    from kubernetes.client import ApiClient

    options = dict(
        image=TRITON_IMAGE,
        model_repository="s3://triton-models/prod",
        lease_timeout=0,
        active_deadline_seconds=None,
        gpus=1,
        cpu="8",
        memory="32Gi",
        shm_size="2Gi",
        node_selector={"nvidia.com/gpu.present": "true"},
        aws_secret_name="triton-s3",
    )
    options.update(overrides)
    pod = PodOptions(**options)
    container = pod.describe(SERVER_ID, "/opt/airflow/triton_models", ["risk_scorer"], OWNER)
    return ApiClient().sanitize_for_serialization(build_pod(pod, container, "ml"))


def test_pod_spec_field_by_field() -> None:
    from kubernetes.client import ApiClient, V1Pod

    pod = pod_dict()
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    meta = pod["metadata"]
    assert (meta["name"], meta["namespace"]) == (SERVER_ID, "ml")
    assert meta["labels"][MANAGED_BY_KEY] == MANAGED_BY
    assert meta["labels"][SERVER_ID_KEY] == SERVER_ID
    assert meta["labels"][RUN_ID_KEY] == k8s_label_value(OWNER.run_id)
    assert meta["labels"][RUN_ID_KEY].startswith("manual__2026-11-21T00_00_00_00_00-")
    assert meta["annotations"][RUN_ID_KEY] == OWNER.run_id  # exact, for the reaper
    assert meta["annotations"][DAG_ID_KEY] == "nightly_scoring"

    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["terminationGracePeriodSeconds"] == 30
    [container] = spec["containers"]
    assert container["name"] == "tritonserver"
    assert container["image"] == TRITON_IMAGE
    assert "--model-repository=s3://triton-models/prod" in container["command"]
    assert f"--id={SERVER_ID}" in container["command"]
    assert "--load-model=risk_scorer" in container["command"]
    assert container["resources"] == {
        "limits": {"nvidia.com/gpu": "1", "cpu": "8", "memory": "32Gi"},
        "requests": {"cpu": "8", "memory": "32Gi"},
    }
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [
        ("http", 8000),
        ("grpc", 8001),
        ("metrics", 8002),
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["envFrom"] == [{"secretRef": {"name": "triton-s3"}}]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in spec["volumes"]

    # The kubernetes client's models read it back unchanged.
    class Response:
        data = json.dumps(pod)

    again = ApiClient().deserialize(Response(), "V1Pod")
    assert isinstance(again, V1Pod)
    assert ApiClient().sanitize_for_serialization(again) == pod


def test_pod_spec_with_a_volume_and_no_gpu() -> None:
    pod = pod_dict(
        model_repository="/models",
        model_repository_pvc="triton-models",
        gpus=0,
        node_selector=None,
        aws_secret_name=None,
        volumes=[{"name": "cache", "emptyDir": {}}],
        volume_mounts=[{"name": "cache", "mountPath": "/cache"}],
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    )
    [container] = pod["spec"]["containers"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert {"name": "model-repository", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert {"name": "cache", "mountPath": "/cache"} in container["volumeMounts"]
    assert {
        "name": "model-repository",
        "persistentVolumeClaim": {"claimName": "triton-models", "readOnly": True},
    } in pod["spec"]["volumes"]
    assert pod["spec"]["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    ]
    with pytest.raises(ValueError, match="absolute path inside the container"):
        pod_dict(model_repository="triton_models")


def test_service_spec() -> None:
    from kubernetes.client import ApiClient

    service = ApiClient().sanitize_for_serialization(
        build_service(server_id=SERVER_ID, namespace="ml", owner=OWNER, pod_uid="uid-1")
    )
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == {SERVER_ID_KEY: SERVER_ID}  # the Pod's label
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("http", 8000, "http"),
        ("grpc", 8001, "grpc"),
        ("metrics", 8002, "metrics"),
    ]
    assert service["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": SERVER_ID, "uid": "uid-1"}
    ]


def test_kubernetes_launch_stop_list_through_the_api(kube: FakeKubernetes) -> None:
    runtime = get_runtime(
        "kubernetes", kubernetes_conn_id="kube_test", model_repository="s3://triton-models/prod", cpu="4"
    )
    info = runtime.launch("/opt/airflow/triton_models", ["risk_scorer"], owner=OWNER)
    server_id = info.handle["server_id"]
    assert info.grpc_url == f"{server_id}.ml.svc.cluster.local:8001"
    assert info.http_url == f"http://{server_id}.ml.svc.cluster.local:8000"
    assert info.handle["namespace"] == "ml"  # from the connection

    [(_, _, _, pod)] = kube.calls("POST", "/namespaces/ml/pods$")
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1", "cpu": "4"}
    assert "--model-repository=s3://triton-models/prod" in pod["spec"]["containers"][0]["command"]
    [(_, _, _, service)] = kube.calls("POST", "/namespaces/ml/services$")
    assert service["metadata"]["ownerReferences"][0]["uid"] == kube.pods[("ml", server_id)]["metadata"]["uid"]

    assert runtime.is_running(info)  # Pending counts: it is being scheduled
    assert runtime.failure_reason(info) is None
    kube.set_pod_status(
        server_id,
        {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "tritonserver",
                    "ready": False,
                    "restartCount": 0,
                    "image": TRITON_IMAGE,
                    "imageID": "",
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}},
                }
            ],
        },
        namespace="ml",
    )
    assert runtime.failure_reason(info) == "its container cannot start: ImagePullBackOff: pull access denied"
    kube.logs[server_id] = "I1121 server.cc:674] loading\nE1121 failed to load 'risk_scorer'"
    tail = runtime.log_tail(info, 5)
    assert "container waiting: ImagePullBackOff" in tail
    assert "failed to load 'risk_scorer'" in tail

    [listed] = runtime.list_servers()
    assert ServerOwner.from_dict(listed.handle["owner"]) == OWNER  # exact, from the annotations

    other = get_runtime("kubernetes", kubernetes_conn_id="kube_test")
    assert other.stop(ServerInfo.from_dict(json.loads(json.dumps(info.to_dict())))) is True
    assert kube.pods == {}
    assert kube.services == {}
    assert other.stop(info) is False  # idempotent
    assert other.is_running(info) is False
    assert other.failure_reason(info) == "its Pod is gone"


def test_kubernetes_service_refused_deletes_the_pod(kube: FakeKubernetes, monkeypatch) -> None:
    runtime = get_runtime("kubernetes", kubernetes_conn_id="kube_test")
    original = kube.route

    def refuse_services(method, path, query, body):
        if method == "POST" and path.endswith("/services"):
            return 403, kube._status(403, "Forbidden", "services is forbidden"), None
        return original(method, path, query, body)

    monkeypatch.setattr(kube, "route", refuse_services)
    with pytest.raises(ServerStartError, match=r"refused the Service.*its Pod was deleted"):
        runtime.launch("/models", None)
    assert kube.pods == {}


def test_provider_lists_the_trigger_and_reaper() -> None:
    from airflow_batch_infer.get_provider_info import get_provider_info

    info = get_provider_info()
    assert info["triggers"][0]["python-modules"] == ["airflow_batch_infer.triggers.server"]
    assert "airflow_batch_infer.operators.reaper" in info["operators"][0]["python-modules"]
    assert os.path.exists(os.path.join(os.path.dirname(__file__), "..", "fake_apis.py"))


# ---------------------------------------------------------------------------- reaper


def test_select_orphans() -> None:
    from airflow_batch_infer.operators.reaper import select_orphans

    def server(server_id: str, owner: ServerOwner | None, age: float) -> ServerInfo:
        handle = {
            "server_id": server_id,
            "owner": owner.to_dict() if owner else None,
            "started_at": 1000 - age,
        }
        return ServerInfo("docker", "", "", "", handle)

    ended = ServerOwner("nightly", "scheduled__2026-11-20T00:00:00+00:00", "start_server")
    running = ServerOwner("nightly", "scheduled__2026-11-21T00:00:00+00:00", "start_server")
    servers = [
        server("old-ended", ended, 3600),
        server("young-ended", ended, 10),
        server("old-running", running, 3600),
        server("unowned", None, 3600),
    ]
    asked = []

    def run_state(dag_id: str, run_id: str) -> str:
        asked.append((dag_id, run_id))
        return "running" if run_id == running.run_id else "success"

    orphans = select_orphans(servers, run_state, now=1000, min_age=600)
    assert [(info.handle["server_id"], reason) for info, reason in orphans] == [
        (
            "old-ended",
            "DAG run nightly / scheduled__2026-11-20T00:00:00+00:00 is no longer queued or running (success)",
        )
    ]
    assert ("nightly", running.run_id) in asked
    with_unowned = select_orphans(servers, run_state, now=1000, min_age=600, stop_unowned=True)
    assert [info.handle["server_id"] for info, _ in with_unowned] == ["old-ended", "unowned"]
