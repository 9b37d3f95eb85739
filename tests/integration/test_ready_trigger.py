"""TritonServerReadyTrigger against a real local tritonserver (no mocks).

The local runtime launches the server without waiting; the trigger's ``run()`` is driven by asyncio here as
the triggerer would drive it, after a ``serialize()`` round trip: ready, a model the server does not have,
the server killed while loading, and the deadline passing.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import time
from pathlib import Path

import pytest

from airflow_batch_infer.runtimes import ServerOwner
from airflow_batch_infer.runtimes.local import LocalTritonRuntime
from airflow_batch_infer.triggers.server import TritonServerReadyTrigger
from tests.conftest import MODEL_REPOSITORY, processes_mentioning

pytestmark = pytest.mark.integration

OWNER = ServerOwner("trigger_test", "manual__2026-11-21T00:00:00+00:00", "start_server")


def run_trigger(info, work_root: Path, models, deadline: float, poll_interval: float = 0.2) -> dict:
    """Serialize the trigger as the operator defers it, rebuild it as the triggerer does, run it once."""
    trigger = TritonServerReadyTrigger(
        server=info.to_dict(),
        runtime="local",
        runtime_options={"work_root": str(work_root)},
        models=models,
        deadline=deadline,
        poll_interval=poll_interval,
    )
    classpath, kwargs = trigger.serialize()
    module, name = classpath.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)

    async def first_event():
        async for event in rebuilt.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(first_event(), timeout=90))


@pytest.fixture
def work_root(tmp_path: Path) -> Path:
    return tmp_path / "servers"


@pytest.fixture
def runtime(work_root: Path) -> LocalTritonRuntime:
    return LocalTritonRuntime(work_root=str(work_root), startup_timeout=60, stop_grace_period=10)


def test_timeout_then_ready_then_missing_model(runtime: LocalTritonRuntime, work_root: Path) -> None:
    info = runtime.launch(str(MODEL_REPOSITORY), ["risk_scorer"], owner=OWNER)
    try:
        assert info.handle["owner"] == OWNER.to_dict()
        # Launched, not ready: a deadline that passes fails with the server's log, and leaves it running.
        # (The deadline has passed already: the server is ready about 0.3 s after launch, so a later one
        # could see it ready at the first poll.)
        event = run_trigger(info, work_root, ["risk_scorer"], deadline=time.time())
        assert event["status"] == "error"
        assert "did not become ready: it was not ready" in event["message"]
        assert "startup_timeout" in event["message"]
        assert "Last lines of its log" in event["message"]
        assert runtime.is_running(info)

        started = time.monotonic()
        event = run_trigger(info, work_root, ["risk_scorer"], deadline=time.time() + 60)
        assert event["status"] == "ready", event
        assert event["ready"] == [info.to_dict()]
        assert event["loading"] == event["failed"] == []
        assert time.monotonic() - started < 30

        # A model the server does not have fails at once, naming what it has.
        started = time.monotonic()
        event = run_trigger(info, work_root, ["nope"], deadline=time.time() + 60)
        assert event["status"] == "error"
        assert (
            "model 'nope' is not in the server's model repository (it has ['risk_scorer'])"
            in event["message"]
        )
        assert time.monotonic() - started < 5
    finally:
        assert runtime.stop(info) is True
    assert processes_mentioning(work_root) == []


def test_server_killed_while_loading(runtime: LocalTritonRuntime, work_root: Path) -> None:
    info = runtime.launch(str(MODEL_REPOSITORY), ["risk_scorer"])
    os.killpg(info.handle["pid"], signal.SIGKILL)  # the server and its Python backend stubs
    started = time.monotonic()
    event = run_trigger(info, work_root, ["risk_scorer"], deadline=time.time() + 60)
    assert event["status"] == "error"
    assert "tritonserver exited before it was ready" in event["message"]
    assert "Last lines of its log" in event["message"]
    assert time.monotonic() - started < 10
    assert runtime.stop(info) is False  # already gone; its shared memory and model copy are cleaned up
    assert not (work_root / info.handle["server_id"] / "models").exists()
    assert processes_mentioning(work_root) == []


def test_trigger_round_trips_through_serialize() -> None:
    trigger = TritonServerReadyTrigger(
        server={
            "runtime": "docker",
            "grpc_url": "h:1",
            "http_url": "http://h:2",
            "metrics_url": "m",
            "handle": {},
        },
        runtime="docker",
        runtime_options={"docker_url": "tcp://gpu:2376", "gpus": "all"},
        models=["risk_scorer"],
        deadline=1.5e9,
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_batch_infer.triggers.server.TritonServerReadyTrigger"
    assert kwargs == {
        "servers": [trigger.servers[0]],
        "runtime": "docker",
        "runtime_options": {"docker_url": "tcp://gpu:2376", "gpus": "all"},
        "models": ["risk_scorer"],
        "deadline": 1.5e9,
        "poll_interval": 5.0,
        "min_ready": 1,
    }
