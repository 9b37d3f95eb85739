"""The ecs runtime against a real local ECS API: ``moto_server`` started by the fixture (no mocks).

The runtime talks through the amazon provider's ``EcsHook`` (and ``AwsLogsHook``, ``EC2Hook``) to the
server named by an ``aws`` connection whose extra has ``endpoint_url``, as it would to AWS. moto places
tasks on registered container instances without running containers, so the server itself never answers:
these tests cover the ECS calls, not Triton's readiness.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest

from airflow_batch_infer.runtimes import ServerInfo, ServerOwner, ServerStartError, get_runtime
from airflow_batch_infer.runtimes.containers import TritonContainer
from airflow_batch_infer.runtimes.ecs import (
    OWNER_ENV,
    STARTED_BY,
    TaskOptions,
    build_run_task,
    build_task_definition,
)

pytestmark = pytest.mark.integration

OWNER = ServerOwner("nightly_scoring", "scheduled__2026-11-21T00:00:00+00:00", "batch_inference.start_server")
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory):
    """A ``moto_server`` on a free local port, and an ``aws`` connection pointing at it."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    # moto moves a task to STOPPED as soon as it is described; keep it RUNNING until stop_task, as ECS does.
    transition = {"model_name": "ecs::task", "transition": {"progression": "manual", "times": 10**6}}
    request = urllib.request.Request(
        f"{url}/moto-api/state-manager/set-transition", data=json.dumps(transition).encode(), method="POST"
    )
    urllib.request.urlopen(request, timeout=5).close()
    patch = pytest.MonkeyPatch()
    conn = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": url, "region_name": REGION},
    }
    patch.setenv("AIRFLOW_CONN_AWS_MOTO", json.dumps(conn))
    try:
        yield url
    finally:
        patch.undo()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def aws(moto: str) -> dict:
    """A GPU cluster with one registered container instance, a subnet, a security group and a log group."""
    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)
    ecs = session.client("ecs", endpoint_url=moto)
    ec2 = session.client("ec2", endpoint_url=moto)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})  # as ECS VPCs usually have
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="triton", Description="triton", VpcId=vpc)["GroupId"]
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]

    def instance() -> str:
        reservation = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet)
        return json.dumps({"instanceId": reservation["Instances"][0]["InstanceId"], "region": REGION})

    ecs.create_cluster(clusterName="gpu")
    ecs.register_container_instance(cluster="gpu", instanceIdentityDocument=instance())
    session.client("logs", endpoint_url=moto).create_log_group(logGroupName="/triton")
    logs = session.client("logs", endpoint_url=moto)
    return {"ecs": ecs, "logs": logs, "subnet": subnet, "group": group, "instance": instance}


def ecs_runtime(aws: dict, **options):
    defaults = dict(
        cluster="gpu",
        aws_conn_id="aws_moto",
        subnets=[aws["subnet"]],
        security_groups=[aws["group"]],
        log_group="/triton",
        model_repository="s3://triton-models/prod",
        execution_role_arn="arn:aws:iam::123456789012:role/ecsTaskExecutionRole",
        task_role_arn="arn:aws:iam::123456789012:role/triton-models-reader",
        memory="4096",  # moto's container instances have 7482 MiB
    )
    defaults.update(options)
    return get_runtime("ecs", **defaults)


def test_specs_field_by_field() -> None:
    spec = build_task_definition(
        TaskOptions(gpus=2, memory="61440", shm_size_mib=4096, log_group="/triton"), region_name=REGION
    )
    [container] = spec["containerDefinitions"]
    assert container["resourceRequirements"] == [{"type": "GPU", "value": "2"}]
    assert container["linuxParameters"] == {"sharedMemorySize": 4096}
    assert [(p["containerPort"], p["hostPort"]) for p in container["portMappings"]] == [
        (8000, 8000),
        (8001, 8001),
        (8002, 8002),
    ]
    assert container["logConfiguration"]["options"] == {
        "awslogs-group": "/triton",
        "awslogs-stream-prefix": "triton",
        "awslogs-region": REGION,
    }
    assert (spec["requiresCompatibilities"], spec["networkMode"], spec["memory"]) == (
        ["EC2"],
        "awsvpc",
        "61440",
    )

    run = build_run_task(
        TaskOptions(container_name="tritonserver", capacity_provider="gpu-asg", subnets=["subnet-1"]),
        TritonContainer(
            server_id="abi-0123456789ab", command=["tritonserver", "--model-repository=s3://m"], owner=OWNER
        ),
        cluster="gpu",
        task_definition="airflow-batch-infer-triton:3",
    )
    assert run["startedBy"] == STARTED_BY
    assert run["capacityProviderStrategy"] == [{"capacityProvider": "gpu-asg", "weight": 1, "base": 0}]
    assert "launchType" not in run
    [override] = run["overrides"]["containerOverrides"]
    assert override["command"] == ["tritonserver", "--model-repository=s3://m"]
    assert json.loads(override["environment"][0]["value"]) == OWNER.to_dict()
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert tags["airflow-batch-infer/run-id"] == OWNER.run_id
    assert run["networkConfiguration"]["awsvpcConfiguration"]["assignPublicIp"] == "DISABLED"
    with pytest.raises(ValueError, match="needs `subnets`"):
        build_run_task(
            TaskOptions(container_name="c", network_mode="awsvpc"),
            TritonContainer(server_id="s", command=[]),
            cluster="gpu",
            task_definition="t",
        )


def test_run_find_address_log_stop(aws: dict) -> None:
    runtime = ecs_runtime(aws, gpus=1)
    info = runtime.launch("/opt/airflow/triton_models", ["risk_scorer"], owner=OWNER)
    handle = info.handle
    # The task's address, from its network interface.
    assert handle["host"].startswith("10.") or handle["host"]
    assert info.grpc_url == f"{handle['host']}:8001"
    assert info.http_url == f"http://{handle['host']}:8000"

    [task] = aws["ecs"].describe_tasks(cluster="gpu", tasks=[handle["task_arn"]], include=["TAGS"])["tasks"]
    assert task["startedBy"] == STARTED_BY
    assert task["launchType"] == "EC2"
    [override] = task["overrides"]["containerOverrides"]
    assert override["name"] == "tritonserver"
    assert "--model-repository=s3://triton-models/prod" in override["command"]
    assert f"--id={handle['server_id']}" in override["command"]
    assert {"name": OWNER_ENV, "value": json.dumps(OWNER.to_dict(), sort_keys=True)} in override[
        "environment"
    ]
    tags = {t["key"]: t["value"] for t in task["tags"]}
    assert tags["app.kubernetes.io/managed-by"] == "airflow-batch-infer"
    definition = aws["ecs"].describe_task_definition(taskDefinition=task["taskDefinitionArn"])[
        "taskDefinition"
    ]
    assert definition["containerDefinitions"][0]["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
    assert definition["taskRoleArn"].endswith("triton-models-reader")

    # The log, from CloudWatch Logs (awslogs stream prefix/container/task id).
    aws["logs"].create_log_stream(logGroupName="/triton", logStreamName=handle["log_stream"])
    aws["logs"].put_log_events(
        logGroupName="/triton",
        logStreamName=handle["log_stream"],
        logEvents=[{"timestamp": int(time.time() * 1000) + i, "message": f"line {i}"} for i in range(5)],
    )
    tail = runtime.log_tail(info, 2)
    assert tail.splitlines()[1:] == ["line 3", "line 4"]

    assert runtime.is_running(info)
    assert runtime.failure_reason(info) is None
    [listed] = [s for s in runtime.list_servers() if s.handle["task_arn"] == handle["task_arn"]]
    assert ServerOwner.from_dict(listed.handle["owner"]) == OWNER

    # Teardown from another worker: a fresh runtime, a JSON round trip of the handle.
    other = ecs_runtime(aws)
    again = ServerInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert other.stop(again) is True
    assert other.stop(again) is False  # idempotent
    assert other.is_running(again) is False
    assert other.failure_reason(again).startswith("its task stopped")
    assert "Stopped by airflow-batch-infer" in other.failure_reason(again)
    assert [s for s in other.list_servers() if s.handle["task_arn"] == handle["task_arn"]] == []


def test_task_definition_is_registered_once_per_spec(aws: dict) -> None:
    first = ecs_runtime(aws, family="triton-reuse").ensure_task_definition()
    assert ecs_runtime(aws, family="triton-reuse").ensure_task_definition() == first
    changed = ecs_runtime(aws, family="triton-reuse", shm_size_mib=8192).ensure_task_definition()
    assert changed != first
    assert changed.endswith(":2")
    assert ecs_runtime(aws, task_definition="mine:7").ensure_task_definition() == "mine:7"


def test_no_capacity_fails_and_names_gpu_capacity(aws: dict) -> None:
    aws["ecs"].create_cluster(clusterName="empty")
    arn = aws["ecs"].register_container_instance(cluster="empty", instanceIdentityDocument=aws["instance"]())[
        "containerInstance"
    ]["containerInstanceArn"]
    aws["ecs"].update_container_instances_state(cluster="empty", containerInstances=[arn], status="DRAINING")
    with pytest.raises(ServerStartError, match=r"could not place.*GPU container instances"):
        ecs_runtime(aws, cluster="empty").launch("s3://m", None)


def test_lease_tags_are_renewed_and_read_by_the_reaper(aws: dict) -> None:
    from airflow_batch_infer.operators.reaper import select_orphans
    from airflow_batch_infer.runtimes.labels import LEASE_RENEWED_KEY, LEASE_TIMEOUT_KEY
    from airflow_batch_infer.runtimes.lease import renew

    runtime = ecs_runtime(aws, lease_timeout=600)
    info = runtime.launch("/opt/airflow/triton_models", ["risk_scorer"], owner=OWNER)
    try:

        def tags() -> dict[str, str]:
            arn = info.handle["task_arn"]
            [task] = aws["ecs"].describe_tasks(cluster="gpu", tasks=[arn], include=["TAGS"])["tasks"]
            return {t["key"]: t["value"] for t in task["tags"]}

        assert tags()[LEASE_TIMEOUT_KEY] == "600"
        launched = float(tags()[LEASE_RENEWED_KEY])
        [listed] = [s for s in runtime.list_servers() if s.handle["task_arn"] == info.handle["task_arn"]]
        # An hour without a renewal: the reaper stops it, though its run is still running.
        [(_, reason)] = select_orphans([listed], lambda d, r: "running", now=launched + 3600, min_age=0)
        assert reason == "its lease expired: not renewed for 3600 s (lease_timeout 600 s)"

        time.sleep(1.1)
        assert renew(info, {"cluster": "gpu", "aws_conn_id": "aws_moto", "region_name": REGION}) is True
        assert float(tags()[LEASE_RENEWED_KEY]) > launched
    finally:
        runtime.stop(info)


def test_a_start_of_two_servers_runs_two_tagged_tasks(aws: dict) -> None:
    from types import SimpleNamespace

    from airflow.sdk.exceptions import TaskDeferred

    from airflow_batch_infer.operators.server import StartTritonServerOperator
    from airflow_batch_infer.runtimes.labels import REPLICA_KEY, RUN_ID_KEY

    options = {
        "cluster": "gpu",
        "aws_conn_id": "aws_moto",
        "subnets": [aws["subnet"]],
        "security_groups": [aws["group"]],
        "log_group": "/triton",
        "model_repository": "s3://triton-models/prod",
        "memory": "2048",
    }
    start = StartTritonServerOperator(
        task_id="start_server",
        model_repository="/opt/airflow/triton_models",
        models=["risk_scorer"],
        runtime="ecs",
        runtime_options=options,
        servers=2,
        deferrable=True,
    )
    aws["ecs"].register_container_instance(cluster="gpu", instanceIdentityDocument=aws["instance"]())  # room
    ti = SimpleNamespace(dag_id=OWNER.dag_id, run_id=OWNER.run_id, task_id="start_server", map_index=-1)
    with pytest.raises(TaskDeferred) as deferred:
        start.execute({"ti": ti})
    servers = deferred.value.trigger.servers
    runtime = ecs_runtime(aws, memory="2048")
    try:
        arns = [s["handle"]["task_arn"] for s in servers]
        assert len(set(arns)) == 2
        tasks = aws["ecs"].describe_tasks(cluster="gpu", tasks=arns, include=["TAGS"])["tasks"]
        tags = [{t["key"]: t["value"] for t in task["tags"]} for task in tasks]
        assert sorted(t[REPLICA_KEY] for t in tags) == ["0", "1"]
        assert {t[RUN_ID_KEY] for t in tags} == {OWNER.run_id}
    finally:
        for server in servers:
            runtime.stop(ServerInfo.from_dict(server))
