"""A filtered run staged on S3 (a local moto_server): the report is written next to the summary on S3,
with the rows filtered at stage, scored and set aside as the warehouse holds them."""

from __future__ import annotations

import json

import duckdb

from airflow_batch_infer import storage
from airflow_batch_infer.parquet_files import open_parquet
from airflow_batch_infer.staging import Manifest
from tests.aws_fixtures import aws_conn, bucket, moto_endpoint, write_run_parts
from tests.integration.test_s3_paths import CONTEXT, persist_into, stage_day_on_s3

__all__ = ["aws_conn", "bucket", "moto_endpoint"]  # fixtures used by name


def test_a_filtered_run_on_s3_gets_its_report_beside_its_summary(bucket: str, tmp_path) -> None:
    chunks = stage_day_on_s3(bucket, filter="transaction_id >= 1500")
    assert [c["rows"] for c in chunks] == [1000, 1000]
    run_dir = chunks[0]["run_dir"]
    manifest = Manifest.load(run_dir)
    assert manifest.filtered_rows == 500
    ids = [open_parquet(c.path).read().column("transaction_id").to_pylist() for c in manifest.chunks]
    assert [i for chunk in ids for i in chunk] == list(range(1500, 3500))
    write_run_parts(run_dir, ids, rejected=frozenset({1500, 2500, 3499}))
    database = tmp_path / "w.duckdb"
    persist = persist_into(database, chunks)
    persist.execute(CONTEXT)

    with duckdb.connect(str(database), read_only=True) as con:
        scored = con.execute("SELECT count(*) FROM scores").fetchone()[0]
        set_aside = con.execute("SELECT count(*) FROM scores_rejects").fetchone()[0]
    report = json.loads(storage.read_text(f"{run_dir}/report.json"))
    assert report["rows"]["in"] == 2500
    assert report["rows"]["filtered"] == 500
    assert (report["rows"]["scored"], report["rows"]["set_aside"]) == (scored, set_aside) == (1997, 3)
    assert sum(report["rows"]["set_aside_by_reason"].values()) == 3
    assert json.loads(storage.read_text(f"{run_dir}/summary.json"))["filtered_rows"] == 500
    page = storage.read_text(f"{run_dir}/report.html")
    assert page.count('src="data:image/png;base64,') == 2
