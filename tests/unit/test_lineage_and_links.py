"""The names that lineage, Assets and links give a run's tables, and the links' URLs for a given XCom."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_batch_infer import links, links_aws
from airflow_batch_infer.assets import table_location

LINKS = [
    "links.TritonMetricsLink",
    "links.TritonServerLogLink",
    "links.KubernetesPodLink",
    "links_aws.EcsTaskLink",  # with the amazon extra, as here
    "links_aws.TritonCloudWatchLogLink",
    "links.OutputTableLink",
    "links.RunReportLink",
]
ECS_FLEET = {
    "runtime": "ecs",
    "grpc_url": "10.0.0.7:8001",
    "metrics_url": "http://10.0.0.7:8002/metrics",
    "handle": {
        "server_id": "abi-1",
        "cluster": "gpu",
        "task_arn": "arn:aws:ecs:eu-west-1:123456789012:task/gpu/0123abcd",
        "log_group": "/batch-infer/triton",
        "log_stream": "triton/triton/0123abcd",
    },
}


def test_airflow_lists_every_link_of_the_provider(airflow_db) -> None:
    airflow = shutil.which("airflow", path=str(Path(sys.executable).parent)) or "airflow"
    done = subprocess.run(
        [airflow, "providers", "links", "-o", "json"], capture_output=True, text=True, check=True
    )
    listed = {row["extra_link_class_name"] for row in json.loads(done.stdout)}
    assert {f"airflow_batch_infer.{name}" for name in LINKS} <= listed


def link_for(monkeypatch, link: object, value: dict) -> str:
    """The URL ``link`` gives when the task's return value (its XCom) is ``value``."""
    monkeypatch.setattr(
        links.XCom, "get_value", lambda *, ti_key, key: value if key == "return_value" else None
    )
    return link.get_link(None, ti_key=None)


def test_the_ecs_links_open_the_task_and_its_log_stream_in_the_console(monkeypatch) -> None:
    assert link_for(monkeypatch, links_aws.EcsTaskLink(), ECS_FLEET) == (
        "https://console.aws.amazon.com/ecs/v2/clusters/gpu/tasks/0123abcd?region=eu-west-1"
    )
    assert link_for(monkeypatch, links_aws.TritonCloudWatchLogLink(), ECS_FLEET) == (
        "https://console.aws.amazon.com/cloudwatch/home?region=eu-west-1#logsV2:log-groups/log-group/"
        "%2Fbatch-infer%2Ftriton/log-events/triton%2Ftriton%2F0123abcd"
    )
    assert link_for(monkeypatch, links.TritonMetricsLink(), ECS_FLEET) == "http://10.0.0.7:8002/metrics"
    assert link_for(monkeypatch, links.KubernetesPodLink(), ECS_FLEET) == ""
    assert link_for(monkeypatch, links.TritonServerLogLink(), ECS_FLEET) == ""


def test_the_pod_link_uses_the_dashboard_url_of_the_configuration(monkeypatch) -> None:
    fleet = {"runtime": "kubernetes", "handle": {"pod_name": "abi-2", "namespace": "gpu-jobs"}}
    assert link_for(monkeypatch, links.KubernetesPodLink(), fleet) == "", "no dashboard configured"
    monkeypatch.setenv(
        "AIRFLOW__BATCH_INFER__KUBERNETES_DASHBOARD_URL", "https://k8s.example/#/pod/{namespace}/{pod_name}"
    )
    assert (
        link_for(monkeypatch, links.KubernetesPodLink(), fleet) == "https://k8s.example/#/pod/gpu-jobs/abi-2"
    )
    assert link_for(monkeypatch, links_aws.EcsTaskLink(), fleet) == ""


def test_persist_links_open_the_s3_prefix_and_the_report(monkeypatch) -> None:
    summary = {"output_uri": "s3://lake/scores/transaction_scores", "run_dir": "s3://aws_default@stage/d/p/r"}
    assert link_for(monkeypatch, links.OutputTableLink(), summary) == (
        "https://s3.console.aws.amazon.com/s3/buckets/lake?prefix=scores/transaction_scores"
    )
    assert link_for(monkeypatch, links.RunReportLink(), summary) == (
        "https://s3.console.aws.amazon.com/s3/object/stage?prefix=d/p/r/report.html"
    )
    local = {"output_uri": "postgres://db:5432/w/public/scores", "run_dir": "/data/staging/d/p/r"}
    assert link_for(monkeypatch, links.OutputTableLink(), local) == "postgres://db:5432/w/public/scores"
    assert link_for(monkeypatch, links.RunReportLink(), local) == "file:///data/staging/d/p/r/report.html"


def test_each_sink_names_its_table_for_assets_and_lineage(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_WAREHOUSE_PG",
        json.dumps({"conn_type": "postgres", "host": "db.internal", "port": 5433, "schema": "analytics"}),
    )
    pg = table_location("postgres", "scores.daily", {"postgres_conn_id": "warehouse_pg"})
    assert (pg.uri, pg.namespace, pg.name) == (
        "postgres://db.internal:5433/analytics/scores/daily",
        "postgres://db.internal:5433",
        "analytics.scores.daily",
    )
    duck = table_location("duckdb", "scores", {"database": str(tmp_path / "w.duckdb")})
    assert (duck.namespace, duck.name) == (f"duckdb://{tmp_path / 'w.duckdb'}", "main.scores")
    assert duck.uri == f"duckdb:{tmp_path / 'w.duckdb'}/main.scores"
    s3 = table_location("s3_parquet", "scores", {"path": "s3://aws_default@lake/tables"})
    assert (s3.uri, s3.namespace, s3.name) == ("s3://lake/tables/scores", "s3://lake", "tables/scores")
    athena = table_location("athena", "lake.scores", {"region_name": "eu-west-1", "location": "s3://x/y"})
    assert (athena.namespace, athena.name) == (
        "awsathena://athena.eu-west-1.amazonaws.com",
        "AwsDataCatalog.lake.scores",
    )
    redshift = table_location(
        "redshift", "scores", {"cluster_identifier": "dw", "database": "prod", "region_name": "us-east-2"}
    )
    assert (redshift.namespace, redshift.name) == ("redshift://dw.us-east-2:5439", "prod.public.scores")
    with pytest.raises(ValueError, match="Unknown sink 'bigquery'"):
        table_location("bigquery", "scores", {})


def test_a_query_is_read_from_the_tables_it_names_in_its_connection_namespace(monkeypatch) -> None:
    pytest.importorskip("airflow.providers.openlineage")
    from airflow_batch_infer.lineage import sql_datasets

    monkeypatch.setenv(
        "AIRFLOW_CONN_SOURCE_PG",
        json.dumps({"conn_type": "postgres", "host": "db.internal", "port": 5432, "schema": "shop"}),
    )
    datasets = sql_datasets(
        "SELECT o.id, c.country FROM sales.orders o JOIN customers c ON c.id = o.customer_id",
        "source_pg",
        None,
        {"id": "int64", "country": "string"},
    )
    assert {(d.namespace, d.name) for d in datasets} == {
        ("postgres://db.internal:5432", "shop.sales.orders"),
        ("postgres://db.internal:5432", "shop.public.customers"),
    }
    assert [f.name for f in datasets[0].facets["schema"].fields] == ["id", "country"]
    embedded = sql_datasets("SELECT * FROM transactions", None, "/data/w.duckdb", {"id": "int64"})
    assert [(d.namespace, d.name) for d in embedded] == [("duckdb:///data/w.duckdb", "main.transactions")]
