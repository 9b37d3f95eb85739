"""The local runtime against a real tritonserver process (no mocks).

Uses the shared server environment (``$BATCH_INFER_HOME/triton-server-env``, built on first use) and a
temporary ``work_root`` per test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from airflow_batch_infer.runtimes import ServerInfo, ServerStartError, get_runtime
from airflow_batch_infer.runtimes.access import server_headers
from airflow_batch_infer.runtimes.local import LocalTritonRuntime, check_server_numpy
from airflow_batch_infer.runtimes.local_processes import free_ports
from airflow_batch_infer.runtimes.probe import answers_as
from tests.conftest import processes_mentioning

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2] / "triton_models"
RISK_ONNX = REPO / "risk_scorer" / "1" / "model.onnx"


@pytest.fixture
def runtime(tmp_path: Path) -> LocalTritonRuntime:
    return LocalTritonRuntime(work_root=str(tmp_path / "servers"), startup_timeout=60, stop_grace_period=10)


def _reference(features: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(RISK_ONNX), providers=["CPUExecutionProvider"])
    return session.run(["probability"], {"features": features})[0]


def _shm_regions(prefix: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"{prefix}*"))


def _write_model(repo: Path, name: str, config: str, files: dict[str, str] | None = None) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))
    for rel, text in (files or {}).items():
        (repo / name / rel).write_text(textwrap.dedent(text))


def _python_model(repo: Path, name: str, model_py: str) -> None:
    """A Python-backend model ``name`` taking ``x`` and giving ``y`` (FP32, one value a row)."""
    config = f"""
        name: "{name}"
        backend: "python"
        max_batch_size: 8
        input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 1 ] }} ]
        output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
        """
    _write_model(repo, name, config, {"1/model.py": model_py})


def _infer(client: grpcclient.InferenceServerClient, features: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("features", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features)
    result = client.infer("risk_scorer", [tensor], outputs=[grpcclient.InferRequestedOutput("probability")])
    return result.as_numpy("probability")


def test_start_infer_stop(runtime: LocalTritonRuntime, tmp_path: Path) -> None:
    info = runtime.start(str(REPO), ["risk_scorer"])
    handle = info.handle
    server_id, pid = handle["server_id"], handle["pid"]
    try:
        assert re.fullmatch(r"abi-[0-9a-f]{12}", server_id)
        assert info.runtime == "local"
        assert info.grpc_url == f"127.0.0.1:{handle['grpc_port']}"
        assert info.http_url == f"http://127.0.0.1:{handle['http_port']}"
        assert info.metrics_url == f"http://127.0.0.1:{handle['metrics_port']}/metrics"
        assert runtime.is_running(info)

        client = grpcclient.InferenceServerClient(info.grpc_url)
        assert client.is_server_ready()
        assert client.is_model_ready("risk_scorer")
        assert client.get_server_metadata().name == server_id  # --id is the server's name
        index = client.get_model_repository_index(headers=server_headers(info))  # restricted: the key
        assert [m.name for m in index.models] == ["risk_scorer"]

        rng = np.random.default_rng(7)
        features = rng.standard_normal((1000, 16)).astype(np.float32)
        probability = _infer(client, features)
        assert probability.dtype == np.float32
        assert probability.shape == (1000, 1)
        np.testing.assert_allclose(probability, _reference(features), atol=1e-5)

        # Concurrent requests of different sizes are merged by the dynamic batcher and split back per
        # request; a bad request among them fails alone.
        sizes = [1, 7, 64, 300, 5, 128, 33, 2] * 4
        batches = [rng.standard_normal((n, 16)).astype(np.float32) for n in sizes]
        results: dict[int, np.ndarray] = {}
        errors: dict[int, Exception] = {}
        done = threading.Semaphore(0)

        def callback(index: int):
            def on_result(result=None, error=None) -> None:
                if error is not None:
                    errors[index] = error
                else:
                    results[index] = result.as_numpy("probability")
                done.release()

            return on_result

        bad = np.zeros((4, 15), dtype=np.float32)
        for i, batch in enumerate([*batches, bad]):
            tensor = grpcclient.InferInput("features", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            client.async_infer(
                "risk_scorer",
                [tensor],
                callback=callback(i),
                outputs=[grpcclient.InferRequestedOutput("probability")],
            )
        for _ in range(len(batches) + 1):
            assert done.acquire(timeout=30)
        assert set(errors) == {len(batches)}
        assert (
            "INVALID_ARGUMENT" in str(errors[len(batches)]) or "expected" in str(errors[len(batches)]).lower()
        )
        for i, batch in enumerate(batches):
            np.testing.assert_allclose(results[i], _reference(batch), atol=1e-5)
        client.close()

        assert server_id in runtime.log_tail(info, 400)
        assert _shm_regions(handle["shm_prefix"])  # the Python backend's regions carry our prefix
    finally:
        # Teardown as from another worker: a fresh runtime and a JSON round trip of the handle.
        again = ServerInfo.from_dict(json.loads(json.dumps(info.to_dict())))
        other = get_runtime("local", work_root=str(tmp_path / "servers"))
        stopped = other.stop(again)

    assert stopped is True
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert processes_mentioning(tmp_path) == []
    assert _shm_regions(handle["shm_prefix"]) == []
    assert not runtime.is_running(info)
    assert runtime.stop(info) is False  # idempotent
    assert Path(handle["log_path"]).exists()  # the log stays for the record


def test_model_that_fails_to_load(runtime: LocalTritonRuntime, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _python_model(
        repo,
        "broken",
        """
        class TritonPythonModel:
            def initialize(self, args):
                raise RuntimeError("boom: deliberately broken model")
        """,
    )
    with pytest.raises(ServerStartError) as caught:
        runtime.start(str(repo))
    message = str(caught.value)
    assert "boom: deliberately broken model" in message  # the server's own error line
    assert "failed to load 'broken'" in message
    server_id = re.search(r"abi-[0-9a-f]{12}", message).group(0)
    assert processes_mentioning(tmp_path) == []
    assert _shm_regions(server_id) == []


def test_onnx_model_without_its_file(runtime: LocalTritonRuntime, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    config = (REPO / "risk_scorer" / "config.pbtxt").read_text().replace('"risk_scorer"', '"no_file"')
    _write_model(repo, "no_file", config)
    with pytest.raises(ServerStartError, match=r"no_file/1/model\.onnx is missing"):
        runtime.start(str(repo))
    assert list((tmp_path / "servers").iterdir()) == []  # nothing launched, nothing left


def test_tensorrtllm_model_is_refused_before_launch(runtime: LocalTritonRuntime, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write_model(
        repo,
        "tensorrt_llm",
        """
        name: "tensorrt_llm"
        backend: "tensorrtllm"
        max_batch_size: 8
        input [ { name: "input_ids" data_type: TYPE_INT32 dims: [ -1 ] } ]
        output [ { name: "output_ids" data_type: TYPE_INT32 dims: [ -1, -1 ] } ]
        """,
    )
    with pytest.raises(ServerStartError, match=r"cannot serve model 'tensorrt_llm'.*GPU runtime"):
        runtime.start(str(repo))
    assert list((tmp_path / "servers").iterdir()) == []


def test_unknown_model_names_what_exists(runtime: LocalTritonRuntime) -> None:
    with pytest.raises(ServerStartError, match=r"\['nope'\] are not in .*risk_scorer"):
        runtime.start(str(REPO), ["nope"])


def test_materialised_repository_converts_onnx_and_leaves_the_source_alone(tmp_path: Path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    source_config = REPO / "risk_scorer" / "config.pbtxt"
    before = source_config.read_bytes()
    runtime = LocalTritonRuntime(onnx_intra_op_threads=2)
    target = tmp_path / "models"
    assert runtime.materialize_repository(REPO, ["risk_scorer"], target) == ["risk_scorer"]

    config = text_format.Parse(
        (target / "risk_scorer" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.backend == "python"
    assert config.platform == ""
    assert config.max_batch_size == 32768
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]
    assert list(config.dynamic_batching.preferred_batch_size) == [16384, 32768]
    assert config.parameters["onnx_intra_op_threads"].string_value == "2"
    assert (target / "risk_scorer" / "1" / "model.py").is_file()
    assert source_config.read_bytes() == before
    assert source_config.stat().st_nlink == 1  # never hard-linked: the copy is rewritten


def test_numpy2_interpreter_is_refused() -> None:
    # The project's own interpreter has numpy 2: inputs would silently arrive as zeros in the stub.
    with pytest.raises(ServerStartError, match=r"numpy 2.*numpy<2"):
        check_server_numpy(sys.executable)
    env = LocalTritonRuntime().ensure_server_env()
    assert check_server_numpy(env.python).startswith("1.")


def test_stop_refuses_another_host_and_ignores_a_reused_pid(runtime: LocalTritonRuntime) -> None:
    elsewhere = ServerInfo(
        "local", "x:1", "http://x:2", "http://x:3/metrics", {"pid": 1, "hostname": "elsewhere"}
    )
    with pytest.raises(RuntimeError, match="own host"):
        runtime.stop(elsewhere)
    # Our own pid, but not a server with that id: never signalled.
    reused = ServerInfo(
        "local",
        "127.0.0.1:1",
        "http://127.0.0.1:2",
        "http://127.0.0.1:3/metrics",
        {"pid": os.getpid(), "server_id": "abi-000000000000", "shm_prefix": "abi-000000000000-shm-"},
    )
    assert runtime.is_running(reused) is False
    assert runtime.stop(reused) is False


def test_server_env_build_is_safe_when_concurrent(tmp_path: Path) -> None:
    env = tmp_path / "env"
    code = (
        "import sys; from airflow_batch_infer.runtimes.local import LocalTritonRuntime as R; "
        "print(R(server_env=sys.argv[1]).ensure_server_env().tritonserver)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(env)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    # The last line is the path printed (Airflow's logging, which the config read sets up, may print first).
    assert {out.strip().splitlines()[-1] for out, _ in outputs} == {
        str(env / "triton-runtime" / "bin" / "tritonserver").encode()
    }
    assert (env / "triton-runtime" / "backends" / "python" / "triton_python_backend_stub").is_file()
    marker = (env / ".batch-infer-server-env").read_text()
    # Idempotent: a second call does not rebuild.
    mtime = (env / "pyvenv.cfg").stat().st_mtime_ns
    LocalTritonRuntime(server_env=str(env)).ensure_server_env()
    assert (env / "pyvenv.cfg").stat().st_mtime_ns == mtime
    assert (env / ".batch-infer-server-env").read_text() == marker


def _wait_until_gone(marker: str | Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_the_server_dies_with_its_supervisor(runtime: LocalTritonRuntime, tmp_path: Path) -> None:
    info = runtime.start(str(REPO), ["risk_scorer"])
    server_id = info.handle["server_id"]
    roles = {Path(f"/proc/{pid}/exe").resolve().name for pid in processes_mentioning(tmp_path)}
    assert "tritonserver" in roles
    assert "triton_python_backend_stub" in roles
    supervisor = info.handle["pid"]
    assert os.getsid(supervisor) == supervisor  # a session of its own: a task's Ctrl-C does not reach it

    os.kill(supervisor, signal.SIGKILL)
    # tritonserver gets SIGKILL from the kernel (parent-death signal); its stubs follow it.
    assert _wait_until_gone(tmp_path, 10) == []
    assert not runtime.is_running(info)
    assert runtime.stop(info) is False
    assert processes_mentioning(f"--id={server_id}") == []


def test_stop_finds_the_server_by_its_id_and_kills_a_keeper_that_does_not_answer(
    runtime: LocalTritonRuntime, tmp_path: Path
) -> None:
    info = runtime.start(str(REPO), ["risk_scorer"])
    supervisor = info.handle["pid"]
    os.kill(supervisor, signal.SIGSTOP)  # a hung keeper: SIGTERM does nothing
    # Teardown from another worker whose copy of the handle lost the pid: the id is enough.
    handle = dict(info.handle, pid=None)
    stopped = get_runtime("local", work_root=str(tmp_path / "servers")).stop(
        ServerInfo.from_dict(dict(info.to_dict(), handle=handle))
    )
    assert stopped is True
    assert processes_mentioning(tmp_path) == []
    assert _shm_regions(info.handle["shm_prefix"]) == []
    assert not (Path(info.handle["workdir"]) / "models").exists()


def test_a_grace_period_lets_a_request_in_flight_finish(runtime: LocalTritonRuntime, tmp_path: Path) -> None:
    """With ``stop_grace_period`` (10 s here), a request that the model's stub is running when the stop
    comes is answered before the server goes."""
    repo = tmp_path / "repo"
    _python_model(
        repo,
        "slow",
        """
        import pathlib
        import time

        import triton_python_backend_utils as pb_utils

        class TritonPythonModel:
            def initialize(self, args):
                self.marker = pathlib.Path(args["model_repository"]) / "executing"

            def execute(self, requests):
                self.marker.touch()
                time.sleep(2)
                return [
                    pb_utils.InferenceResponse(
                        [pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * 2)]
                    )
                    for r in requests
                ]
        """,
    )
    info = runtime.start(str(repo))
    marker = Path(info.handle["workdir"]) / "models" / "slow" / "executing"
    answers: dict[str, object] = {}

    def infer() -> None:
        client = grpcclient.InferenceServerClient(info.grpc_url)
        tensor = grpcclient.InferInput("x", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.array([[1.5]], dtype=np.float32))
        try:
            answers["y"] = client.infer("slow", [tensor]).as_numpy("y")
        except InferenceServerException as error:
            answers["error"] = error

    request = threading.Thread(target=infer)
    request.start()
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the request never reached the model"
    assert runtime.stop(info) is True
    request.join(10)
    assert "error" not in answers, answers
    np.testing.assert_allclose(answers["y"], [[3.0]])
    assert processes_mentioning(tmp_path) == []
    assert _shm_regions(info.handle["shm_prefix"]) == []


def test_by_default_the_sigkill_follows_the_sigterm(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """At teardown nothing of the run is in flight: the default stop does not wait out a grace period, and
    leaves nothing behind."""
    runtime = LocalTritonRuntime(work_root=str(tmp_path / "servers"), startup_timeout=60)
    info = runtime.start(str(REPO), ["risk_scorer"])
    with caplog.at_level("INFO", logger="airflow_batch_infer.runtimes.local_processes"):
        assert runtime.stop(info) is True
    kills = [r.getMessage() for r in caplog.records if "SIGKILL" in r.getMessage()]
    assert len(kills) == 1, caplog.text
    assert kills[0].endswith("process(es) left 0 s after SIGTERM; SIGKILL."), kills
    assert processes_mentioning(tmp_path) == []
    assert _shm_regions(info.handle["shm_prefix"]) == []
    assert not (Path(info.handle["workdir"]) / "models").exists()


def test_stop_fails_when_the_server_still_answers_on_its_port(
    runtime: LocalTritonRuntime, tmp_path: Path
) -> None:
    """A server that is not among this host's processes but still answers as itself is not 'stopped'."""
    server_id = "abi-0123456789ab"
    http_port = free_ports(1)[0]
    body = json.dumps({"name": server_id})
    script = (
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(sys.argv[2].encode())\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )
    impostor = subprocess.Popen([sys.executable, "-c", script, str(http_port), body])
    try:
        deadline = time.monotonic() + 10
        while not answers_as(f"http://127.0.0.1:{http_port}", server_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Its supervisor: a process that names the server id (a stand-in that exits on SIGTERM).
        keeper = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)", f"--id={server_id}"], start_new_session=True
        )
        info = ServerInfo(
            "local",
            "127.0.0.1:1",
            f"http://127.0.0.1:{http_port}",
            "http://127.0.0.1:1/metrics",
            {"pid": keeper.pid, "server_id": server_id, "shm_prefix": f"{server_id}-shm-"},
        )
        while not processes_mentioning(f"--id={server_id}") and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(
            RuntimeError, match=rf"{server_id} still answers at http://127\.0\.0\.1:{http_port}"
        ):
            runtime.stop(info)
        keeper.wait(timeout=10)
    finally:
        impostor.kill()
        impostor.wait()


def test_the_server_gets_an_allowlisted_environment_not_the_workers_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", "postgresql://user:worker-secret@db/warehouse")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runtime = LocalTritonRuntime(work_root=str(tmp_path / "servers"), environment={"MODEL_FLAG": "on"})
    info = runtime.start(str(REPO), ["risk_scorer"])
    try:
        pids = processes_mentioning(tmp_path)
        roles = {Path(f"/proc/{pid}/exe").resolve().name for pid in pids}
        assert {"tritonserver", "triton_python_backend_stub"} <= roles
        for pid in pids:  # supervisor, server and the stubs that run the models' code
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"worker-secret" not in environ
            assert b"OMP_NUM_THREADS=1" in environ
            assert b"MODEL_FLAG=on" in environ
    finally:
        runtime.stop(info)


def test_restricted_api_needs_the_servers_key_for_shared_memory_and_model_control(tmp_path: Path) -> None:

    runtime = LocalTritonRuntime(work_root=str(tmp_path / "servers"))  # restricted by default
    info = runtime.start(str(REPO), ["risk_scorer"])
    server = json.loads(json.dumps(info.to_dict()))  # what a task gets: the key's file, not the key
    key_file = Path(server["handle"]["api_key_file"])
    try:
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.read_text() not in json.dumps(server)
        client = grpcclient.InferenceServerClient(info.grpc_url)
        with pytest.raises(
            Exception, match="restricted, expecting header 'triton-grpc-protocol-batch-infer-key'"
        ):
            client.get_system_shared_memory_status()
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("risk_scorer")
        assert client.is_model_ready("risk_scorer")  # the failed unload did nothing
        client.get_system_shared_memory_status(headers=server_headers(server))
        # Health, metadata and inference need no key.
        features = np.zeros((3, 16), dtype=np.float32)
        assert _infer(client, features).shape == (3, 1)
        assert httpx.get(f"{info.http_url}/v2/models/risk_scorer").status_code == 200
        client.close()
    finally:
        runtime.stop(info)


def test_an_infer_task_sends_a_restricted_servers_key_for_its_shared_memory(tmp_path: Path) -> None:
    """With restricted_api, the infer task takes the key from the server's handle: shared memory works."""
    from transactions_data import FEATURES, write_transactions

    from airflow_batch_infer.client.streaming import InferenceError
    from airflow_batch_infer.operators.infer import TritonInferenceOperator
    from airflow_batch_infer.staging import stage_parquet

    runtime = LocalTritonRuntime(work_root=str(tmp_path / "servers"))  # restricted by default
    info = runtime.start(str(REPO), ["risk_scorer"])
    server = json.loads(json.dumps(info.to_dict()))
    write_transactions(tmp_path / "in", 3_000, files=1)
    chunk = stage_parquet(tmp_path / "in", tmp_path / "run").chunks[0].to_dict()
    arguments = {"chunk": chunk, "model_name": "risk_scorer", "inputs": {"features": FEATURES}}
    try:
        result = TritonInferenceOperator(
            task_id="infer", server=server, shared_memory="on", **arguments
        ).execute({})
        assert (result["rows_out"], result["shared_memory"]) == (3_000, True)
        # Given only the address, a task has no key: the server refuses it its shared-memory API.
        keyless = TritonInferenceOperator(
            task_id="infer", server=info.grpc_url, shared_memory="on", retry_attempts=1, **arguments
        )
        with pytest.raises(InferenceError, match="restricted"):
            keyless.execute({})
    finally:
        runtime.stop(info)
