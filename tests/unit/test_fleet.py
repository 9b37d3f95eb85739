"""servers=N: how many servers "auto" means, each replica's GPUs, the fleet a start task returns, and the
Pods a kubernetes start asks for (against the Kubernetes API stand-in of tests/fake_apis.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_batch_infer.operators.server import StartTritonServerOperator
from airflow_batch_infer.runtimes import ServerInfo
from airflow_batch_infer.runtimes.fleet import (
    fleet_output,
    fleet_servers,
    gpu_share,
    replica_options,
    resolve_servers,
)
from airflow_batch_infer.runtimes.labels import REPLICA_KEY, RUN_ID_KEY, k8s_label_value
from tests.fake_apis import FakeKubernetes


def test_auto_is_one_server_on_a_host_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi
    assert resolve_servers("auto", "local") == 1
    assert resolve_servers("auto", "docker") == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert resolve_servers("auto", "local") == 4
    assert resolve_servers("auto", "kubernetes") == 1  # Pods get nodes of their own: say how many
    assert resolve_servers("3", "local") == 3  # rendered from a template
    for wrong in (0, "many", -2):
        with pytest.raises(ValueError, match="servers must be"):
            resolve_servers(wrong, "local")


def test_each_replica_gets_its_share_of_the_gpus() -> None:
    gpus = ["0", "1", "2", "3", "4"]
    assert [gpu_share(i, 2, gpus) for i in range(2)] == [["0", "1", "2"], ["3", "4"]]
    assert gpu_share(1, 8, gpus) == gpus  # fewer GPUs than servers: they share all
    local = replica_options("local", {"environment": {"A": "1"}}, 1, 2, gpus)
    assert local["environment"] == {"A": "1", "CUDA_VISIBLE_DEVICES": "3,4"}
    assert replica_options("docker", {"gpus": 1}, 0, 2, gpus)["gpus"] == ["0", "1", "2"]
    assert replica_options("docker", {"gpus": 0}, 0, 2, gpus) == {"gpus": 0}  # a CPU server stays one
    assert replica_options("kubernetes", {"gpus": 1}, 1, 2, gpus) == {"gpus": 1}
    assert replica_options("local", {}, 0, 2, []) == {}  # no GPUs: nothing to share


def test_a_fleet_is_one_servers_dict_with_every_server_beside_it() -> None:
    servers = [
        ServerInfo("local", f"127.0.0.1:{p}", f"http://127.0.0.1:{p + 1}", "m", {"server_id": f"s{p}"})
        for p in (1, 5)
    ]
    fleet = json.loads(json.dumps(fleet_output(servers)))
    assert fleet_servers(fleet) == servers
    assert ServerInfo.from_dict(fleet) == servers[0]  # code that knows one server gets the first
    assert fleet_servers(servers[0].to_dict()) == [servers[0]]  # a start task from before servers=N
    assert fleet_servers("127.0.0.1:8001") == fleet_servers(None) == []


def context(task_id: str = "start_server") -> dict:
    return {
        "ti": SimpleNamespace(
            dag_id="nightly", run_id="scheduled__2026-12-06T00:00:00+00:00", task_id=task_id, map_index=-1
        )
    }


def test_a_kubernetes_start_of_three_servers_asks_for_three_spread_pods(kube: FakeKubernetes) -> None:
    start = StartTritonServerOperator(
        task_id="start_server",
        model_repository="/models",
        models=["risk_scorer"],
        runtime="kubernetes",
        runtime_options={"kubernetes_conn_id": "kube_test", "model_repository": "s3://m/prod", "gpus": 1},
        servers=3,
        min_ready=2,
        deferrable=True,
    )
    with pytest.raises(TaskDeferred) as deferred:
        start.execute(context())
    trigger = deferred.value.trigger
    assert trigger.min_ready == 2
    assert len(trigger.servers) == 3
    assert len({s["grpc_url"] for s in trigger.servers}) == 3  # each its own endpoint: no balancer
    pods = [kube.pods[("ml", s["handle"]["server_id"])] for s in trigger.servers]
    assert sorted(p["metadata"]["annotations"][REPLICA_KEY] for p in pods) == ["0", "1", "2"]
    for pod in pods:
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        [term] = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
        assert selector[RUN_ID_KEY] == k8s_label_value("scheduled__2026-12-06T00:00:00+00:00")
        assert all(pod["metadata"]["labels"][k] == v for k, v in selector.items())  # it selects its siblings
    assert len(kube.services) == 3
