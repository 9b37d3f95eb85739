"""docker-compose.yaml, parsed (no Docker engine here): every service, port and volume the docs name.

The table of docs/how-to/docker-compose.md ("The whole stack with docker compose") is read and checked row
by row against the file, so that the two cannot drift apart.
"""

from __future__ import annotations

import re

import pytest
import yaml

from airflow_batch_infer.runtimes.containers import TRITON_IMAGE
from tests.conftest import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def docs_rows() -> list[dict[str, str]]:
    text = (REPO / "docs" / "how-to" / "docker-compose.md").read_text()
    section = text.split("# The whole stack with docker compose", 1)[1]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            rows.append(dict(zip(["service", "ports", "volumes", "gpu"], cells, strict=True)))
    return rows


ROWS = docs_rows()


def test_docs_name_every_service() -> None:
    assert sorted(re.sub(r"`", "", r["service"]) for r in ROWS) == sorted(SERVICES)


@pytest.mark.parametrize("row", ROWS, ids=[r["service"].strip("`") for r in ROWS])
def test_service_matches_docs(row: dict[str, str]) -> None:
    name = row["service"].strip("`")
    service = SERVICES[name]
    published = {str(p).split(":")[-2] for p in service.get("ports", [])}
    assert published == set(re.findall(r"`(\d+)`", row["ports"]))

    volumes = " ".join(str(v) for v in service.get("volumes", []))
    named = re.findall(r"`([^`]+)`", row["volumes"])
    if row["volumes"].startswith("the same"):
        named += re.findall(
            r"`([^`]+)`", next(r for r in ROWS if r["service"] == "`airflow-apiserver`")["volumes"]
        )
    for volume in named:
        if volume.startswith(("./", "/var/")):
            assert volume in volumes, (name, volume)
        elif volume not in ("/models", "triton-models"):
            assert volume in COMPOSE["volumes"], volume
            if name != "airflow-init":
                assert f"{volume}:" in volumes, (name, volume)
    if name == "airflow-init":
        assert "/opt/airflow/data" in " ".join(service["command"])

    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if row["gpu"].startswith("yes"):
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    else:
        assert devices == []


def test_triton_service() -> None:
    triton = SERVICES["triton"]
    assert triton["image"] == TRITON_IMAGE  # the same pinned tag as the runtimes
    assert "--model-repository=/models" in triton["command"]
    assert triton["shm_size"] == "1g"
    assert triton["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])


def test_airflow_services_share_the_image_and_settings() -> None:
    airflow = [n for n in SERVICES if n.startswith("airflow-")]
    assert len(airflow) == 6
    for name in airflow:
        service = SERVICES[name]
        assert service["image"] == "airflow-batch-infer:local"
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres/airflow")
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
        assert env["AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"] == "true"
    worker = SERVICES["airflow-worker"]
    assert worker["command"] == "celery worker"
    assert "/var/run/docker.sock:/var/run/docker.sock" in worker["volumes"]
    # The docker runtime's containers join the stack's network by this name (docs, reaper settings).
    assert COMPOSE["networks"]["default"]["name"] == "airflow-batch-infer"
    assert '"network": "airflow-batch-infer"' in worker["environment"]["BATCH_INFER_REAPED_RUNTIMES"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "FROM apache/airflow:${AIRFLOW_VERSION}" in dockerfile
    assert "[docker,kubernetes]" in dockerfile
    assert "--constraint /opt/batch-infer/requirements/lock.txt" in dockerfile


def test_every_port_is_published_on_loopback_only() -> None:
    ports = [(name, str(p)) for name, service in SERVICES.items() for p in service.get("ports", [])]
    assert ports
    assert [(name, p) for name, p in ports if not p.startswith("127.0.0.1:")] == []


def test_the_trial_credentials_are_named_as_such() -> None:
    header = (REPO / "docker-compose.yaml").read_text().split("name: airflow-batch-infer", 1)[0]
    for credential in (
        "airflow/airflow",
        "minioadmin/minioadmin",
        "change-me-batch-infer",
        "AIRFLOW_FERNET_KEY",
    ):
        assert credential in header
    assert "For a trial only" in header
