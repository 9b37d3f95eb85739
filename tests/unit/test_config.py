"""The [batch_infer] configuration section: read with Airflow's config API, shown by `airflow config list`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_batch_infer.config import SECTION, SETTINGS, get_float, get_setting
from airflow_batch_infer.get_provider_info import get_provider_info
from airflow_batch_infer.paths import batch_infer_home, triton_server_env

REPO = Path(__file__).resolve().parents[2]


def test_the_historical_variable_wins_then_airflow_config_then_the_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("BATCH_INFER_HOME", raising=False)
    monkeypatch.delenv("AIRFLOW__BATCH_INFER__HOME", raising=False)
    assert batch_infer_home() == Path.home() / ".local" / "share" / "airflow-batch-infer"

    monkeypatch.setenv("AIRFLOW__BATCH_INFER__HOME", str(tmp_path / "from-airflow"))
    assert batch_infer_home() == tmp_path / "from-airflow"
    monkeypatch.delenv("BATCH_INFER_TRITON_ENV", raising=False)
    assert triton_server_env() == tmp_path / "from-airflow" / "triton-server-env"

    monkeypatch.setenv("BATCH_INFER_HOME", str(tmp_path / "legacy"))
    assert batch_infer_home() == tmp_path / "legacy"


def test_numbers_are_read_and_a_bad_one_names_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW__BATCH_INFER__LEASE_TIMEOUT", raising=False)
    assert get_float("lease_timeout") == 1800.0
    monkeypatch.setenv("AIRFLOW__BATCH_INFER__LEASE_TIMEOUT", "600")
    assert get_float("lease_timeout") == 600.0
    monkeypatch.setenv("AIRFLOW__BATCH_INFER__LEASE_TIMEOUT", "ten minutes")
    with pytest.raises(ValueError, match=r"\[batch_infer\] lease_timeout must be a number.*LEASE_TIMEOUT"):
        get_float("lease_timeout")
    monkeypatch.setenv("BATCH_INFER_STAGING_RETENTION_DAYS", "3")
    assert get_float("staging_retention_days") == 3.0


def test_the_default_runtime_reaches_the_task_group(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk import DAG

    from airflow_batch_infer.task_group import batch_inference

    monkeypatch.setenv("AIRFLOW__BATCH_INFER__DEFAULT_RUNTIME", "docker")
    assert get_setting("default_runtime") == "docker"
    with DAG(dag_id="configured_runtime", schedule=None) as configured:
        batch_inference(
            model_name="m", inputs={"x": "a"}, table="t", model_repository="/models", source="/in"
        )
    with DAG(dag_id="explicit_runtime", schedule=None) as explicit:
        batch_inference(
            model_name="m",
            inputs={"x": "a"},
            table="t",
            model_repository="/models",
            source="/in",
            runtime="local",
        )
    assert configured.get_task("batch_inference.start_server").runtime == "docker"
    assert explicit.get_task("batch_inference.start_server").runtime == "local"

    monkeypatch.delenv("AIRFLOW__BATCH_INFER__DEFAULT_RUNTIME")
    assert get_setting("default_runtime") == "local"


def test_provider_info_declares_the_section_as_airflow_validates_it() -> None:
    from airflow.providers_manager import _create_provider_info_schema_validator

    info = get_provider_info()
    _create_provider_info_schema_validator().validate(info)
    options = info["config"][SECTION]["options"]
    assert (
        set(options)
        == set(SETTINGS)
        == {
            "home",
            "triton_server_env",
            "lease_timeout",
            "staging_retention_days",
            "default_runtime",
        }
    )
    assert options["lease_timeout"]["default"] == "1800"


def test_airflow_config_list_shows_the_section(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "AIRFLOW__BATCH_INFER__DEFAULT_RUNTIME": "kubernetes",
    }

    def airflow(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(Path(sys.executable).parent / "airflow"), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=120)

    listed = airflow("config", "list", "--section", SECTION, "--include-descriptions", "--show-values")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert f"[{SECTION}]" in listed.stdout
    assert "default_runtime = kubernetes" in listed.stdout
    assert "lease_timeout = 1800" in listed.stdout
    assert "staging_retention_days" in listed.stdout
    assert "Root folder of the embedded defaults" in listed.stdout

    got = airflow("providers", "get", "airflow-provider-batch-infer", "--full", "-o", "json")
    assert got.returncode == 0, got.stderr[-2000:]
    provider = json.loads(got.stdout)
    provider = provider[0] if isinstance(provider, list) else provider
    assert SECTION in json.dumps(provider)
