"""Fixtures for the production data paths: a local moto server for AWS, and a private PostgreSQL schema.

Import the fixtures into a test module (``from tests.aws_fixtures import aws_conn, ...``). Everything runs
on this machine: moto listens on 127.0.0.1 only and is stopped at the end of the session; the PostgreSQL
schema is dropped at the end of the session.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

AWS_CONN_ID = "aws_test"
PG_CONN_ID = "pg_test"
PG_DSN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "test"}
_SERVER = Path(__file__).with_name("moto_server.py")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# One moto server per test process, however many modules import the fixture (each import makes its own
# session fixture): Airflow caches the filesystem of a connection, so every test must reach the same server.
_MOTO: dict[str, Any] = {"server": None, "url": None, "users": 0}


def _start_moto() -> str:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, str(_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                _stop(server)
                raise RuntimeError(f"moto_server did not start on {url}") from None
            time.sleep(0.1)
    _MOTO.update(server=server, url=url)
    return url


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A ``moto_server`` on a free loopback port (S3, Glue, Athena, Redshift Data), stopped at the end."""
    url = _MOTO["url"] or _start_moto()
    _MOTO["users"] += 1
    try:
        yield url
    finally:
        _MOTO["users"] -= 1
        if _MOTO["users"] == 0:
            _stop(_MOTO["server"])
            _MOTO.update(server=None, url=None)


@pytest.fixture(scope="session")
def aws_conn(moto_endpoint: str) -> Iterator[str]:
    """A real Airflow ``aws`` connection (from the environment) pointed at the moto server."""
    values = {
        f"AIRFLOW_CONN_{AWS_CONN_ID.upper()}": json.dumps(
            {"conn_type": "aws", "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"}}
        ),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        yield AWS_CONN_ID


def aws_client(service: str) -> Any:
    """A boto3 client of the test connection (through Airflow's hook, so the same endpoint is used)."""
    key = (service, _MOTO["url"])
    if key not in _CLIENTS:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        _CLIENTS[key] = AwsBaseHook(aws_conn_id=AWS_CONN_ID, client_type=service).get_conn()
    return _CLIENTS[key]


_CLIENTS: dict[tuple[str, str | None], Any] = {}


@pytest.fixture
def bucket(aws_conn: str) -> str:
    """A new, empty bucket on the moto server."""
    name = f"abi-{uuid.uuid4().hex[:12]}"
    aws_client("s3").create_bucket(Bucket=name)
    return name


def s3_url(bucket: str, key: str = "") -> str:
    """``s3://aws_test@bucket/key``: a location that names the test connection."""
    return f"s3://{AWS_CONN_ID}@{bucket}/{key}".rstrip("/")


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[str]:
    """A schema of its own in the local PostgreSQL (database ``test``), dropped at the end of the session.

    The ``pg_test`` connection points at the database; skipped where no server listens on 127.0.0.1:5432.
    """
    import psycopg

    try:
        admin = psycopg.connect(**PG_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as err:
        pytest.skip(f"No PostgreSQL on 127.0.0.1:5432 ({err})")
    schema = f"abi_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    uri = f"postgresql://{PG_DSN['user']}@{PG_DSN['host']}:{PG_DSN['port']}/{PG_DSN['dbname']}"
    previous = os.environ.get(f"AIRFLOW_CONN_{PG_CONN_ID.upper()}")
    os.environ[f"AIRFLOW_CONN_{PG_CONN_ID.upper()}"] = uri
    try:
        yield schema
    finally:
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()
        if previous is None:
            os.environ.pop(f"AIRFLOW_CONN_{PG_CONN_ID.upper()}", None)
        else:
            os.environ[f"AIRFLOW_CONN_{PG_CONN_ID.upper()}"] = previous


def pg_query(sql: str, params: Any = None) -> list[tuple]:
    """Run a query on the test database in its own connection; return the rows (empty for no result)."""
    import psycopg

    with psycopg.connect(**PG_DSN, autocommit=True) as con:
        cursor = con.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def write_run_parts(
    run_dir: str | Path, ids_per_chunk: list[list[int]], rejected: frozenset[int] = frozenset()
) -> tuple[list, list]:
    """Write a run's output and rejects parts the way the infer task does (staging's atomic writers).

    Each id becomes an output row (``score`` = id / 100, ``label`` = ``"r<id>"``) unless it is in
    ``rejected``, which puts it in the rejects part with a reason.
    """
    import pyarrow as pa

    from airflow_batch_infer.parquet_files import parquet_writer
    from airflow_batch_infer.staging import atomic_target, commit, output_part_path, rejects_part_path

    outputs, rejects = [], []
    for index, ids in enumerate(ids_per_chunk):
        kept = [i for i in ids if i not in rejected]
        aside = [i for i in ids if i in rejected]
        tables = (
            (
                pa.table(
                    {
                        "row_id": pa.array(kept, pa.int64()),
                        "score": pa.array([i / 100 for i in kept], pa.float32()),
                        "label": pa.array([f"r{i}" for i in kept], pa.string()),
                    }
                ),
                output_part_path(run_dir, index),
                outputs,
            ),
            (
                pa.table(
                    {
                        "row_id": pa.array(aside, pa.int64()),
                        "reject_reason": pa.array(["nan input"] * len(aside), pa.string()),
                    }
                ),
                rejects_part_path(run_dir, index),
                rejects,
            ),
        )
        for table, final, collected in tables:
            tmp = atomic_target(final)
            writer = parquet_writer(tmp, table.schema)
            writer.write_table(table)
            writer.close()
            commit(tmp, final)
            collected.append(final)
    return outputs, rejects
