"""The local runtime never installs packages inside a task: a missing server environment fails at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_batch_infer.runtimes.local import LocalTritonRuntime
from airflow_batch_infer.runtimes.local_env import ServerEnvMissingError

REPO = Path(__file__).resolve().parents[2]


def test_a_start_without_a_server_environment_names_the_command_and_installs_nothing(tmp_path: Path) -> None:
    env = tmp_path / "no-server-env"
    runtime = LocalTritonRuntime(server_env=str(env), work_root=str(tmp_path / "servers"))

    with pytest.raises(ServerEnvMissingError) as err:
        runtime.start(str(REPO / "triton_models"), ["risk_scorer"])

    assert isinstance(err.value, AirflowFailException)  # not retried: the next try would find none either
    message = str(err.value)
    assert f"python -m airflow_batch_infer.runtimes.local prepare --server-env {env}" in message
    assert "triton_server_env" in message
    assert not env.exists()  # nothing was built or installed
    assert not (tmp_path / "servers").exists() or not any((tmp_path / "servers").iterdir())


def test_an_out_of_date_environment_is_not_rebuilt_by_a_task(tmp_path: Path) -> None:
    env = tmp_path / "old-env"
    env.mkdir()
    (env / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (env / ".batch-infer-server-env").write_text("an older requirements hash\n{}\n")
    runtime = LocalTritonRuntime(server_env=str(env))

    with pytest.raises(ServerEnvMissingError, match=r"is out of date.*prepare --server-env"):
        runtime.start(str(REPO / "triton_models"), ["risk_scorer"])
    assert sorted(p.name for p in env.iterdir()) == [".batch-infer-server-env", "pyvenv.cfg"]
