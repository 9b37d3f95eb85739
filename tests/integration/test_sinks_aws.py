"""S3 Parquet, Athena and Redshift sinks against a local moto_server through a real ``aws`` connection.

The Parquet files are real and read back. Athena and Redshift do not run in moto: the statements the
sinks submitted are read back through moto's Athena and Redshift Data APIs and checked, and no wait is
unbounded (moto leaves Redshift statements STARTED forever).
"""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pytest

from airflow_batch_infer import storage
from airflow_batch_infer.parquet_files import open_parquet
from airflow_batch_infer.sinks import SchemaMismatchError, get_sink
from airflow_batch_infer.sinks import athena as athena_sink
from airflow_batch_infer.sinks import redshift as redshift_sink
from airflow_batch_infer.sinks import s3_parquet as s3_parquet_sink
from tests.aws_fixtures import (
    AWS_CONN_ID,
    aws_client,
    aws_conn,
    bucket,
    moto_endpoint,
    s3_url,
    write_run_parts,
)

__all__ = ["aws_conn", "bucket", "moto_endpoint"]  # fixtures used by name

ROLE = "arn:aws:iam::123456789012:role/redshift-copy"


def read_ids(files: list[str]) -> list[int]:
    return sorted(i for f in files for i in open_parquet(f).read().column("row_id").to_pylist())


def keys(bucket: str, prefix: str) -> list[str]:
    listed = aws_client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def fail_on_call(monkeypatch: pytest.MonkeyPatch, module, number: int) -> None:
    """Make ``module.storage.copy`` fail on its ``number``-th call (the earlier calls go through)."""
    copy, calls = storage.copy, []

    def flaky(source, target):
        calls.append(target)
        if len(calls) == number:
            raise OSError(f"upload of {target} interrupted")
        copy(source, target)

    monkeypatch.setattr(module.storage, "copy", flaky)


# --- s3_parquet ---------------------------------------------------------------------------------------


def test_s3_parquet_replaces_a_partition_with_a_new_version(bucket: str, tmp_path) -> None:
    outputs, rejects = write_run_parts(tmp_path / "run", [[1, 2, 3], [4, 5]], rejected=frozenset({5}))
    dataset = get_sink("s3_parquet", table="scores", path=f"s3://{bucket}/lake", conn_id=AWS_CONN_ID)

    first = dataset.replace_partition("2026-11-21", outputs, rejects)
    second = dataset.replace_partition("2026-11-21", outputs, rejects)
    dataset.replace_partition("2026-11-22", outputs[:1], rejects[:1])

    assert (first.rows, first.rejected, first.replaced) == (4, 1, 0)
    assert (second.rows, second.rejected, second.replaced) == (4, 1, 4)
    assert first.location == f"s3://{bucket}/lake/scores/batch_partition=2026-11-21"
    day = "lake/scores/batch_partition=2026-11-21/"
    marker = json.loads(storage.read_text(s3_url(bucket, day + "_SUCCESS")))
    version = marker["version"]
    files = [f"{version}/part-00000.parquet", f"{version}/part-00001.parquet"]
    assert keys(bucket, day) == [day + "_SUCCESS", *(day + f for f in files)]
    assert (marker["rows"], marker["files"]) == (4, files)
    lake = s3_url(bucket, "lake")
    for partition, ids in (("2026-11-21", [1, 2, 3, 4]), ("2026-11-22", [1, 2, 3])):
        table = s3_parquet_sink.read_partition(lake, "scores", partition)
        assert sorted(table.column("row_id").to_pylist()) == ids  # each row once
        assert set(table.column("batch_partition").to_pylist()) == {partition}


def test_s3_parquet_after_a_version_write_that_failed_halfway(bucket: str, tmp_path, monkeypatch) -> None:
    dataset = get_sink("s3_parquet", table="scores", path=s3_url(bucket, "lake"))
    dataset.replace_partition("p", *write_run_parts(tmp_path / "old", [[1, 2], [3]], rejected=frozenset({3})))
    folder = "lake/scores/batch_partition=p/"
    before = keys(bucket, folder)
    outputs, rejects = write_run_parts(tmp_path / "new", [[10, 11], [12, 13], [14]], rejected=frozenset({14}))
    # calls 1-3 copy the outputs into the new version, 4-6 the rejects: fail on the 5th.
    fail_on_call(monkeypatch, s3_parquet_sink, 5)
    with pytest.raises(OSError, match="interrupted"):
        dataset.replace_partition("p", outputs, rejects)

    lake = s3_url(bucket, "lake")
    assert keys(bucket, folder) == before  # the old version as committed; the new one removed
    assert read_ids(s3_parquet_sink.committed_files(lake, "scores", "p")) == [1, 2]
    assert read_ids(s3_parquet_sink.committed_files(lake, "scores_rejects", "p")) == [3]

    monkeypatch.undo()
    dataset.replace_partition("p", outputs, rejects)
    assert read_ids(s3_parquet_sink.committed_files(lake, "scores", "p")) == [10, 11, 12, 13]
    assert read_ids(s3_parquet_sink.committed_files(lake, "scores_rejects", "p")) == [14]
    assert len([k for k in keys(bucket, folder) if k.endswith(".parquet")]) == 3  # the new version only


def test_s3_parquet_refuses_outputs_that_do_not_fit_the_dataset(bucket: str, tmp_path) -> None:
    outputs, rejects = write_run_parts(tmp_path / "run", [[1]])
    get_sink("s3_parquet", table="scores", path=s3_url(bucket, "lake")).replace_partition(
        "p", outputs, rejects
    )
    (tmp_path / "other").mkdir()
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"row_id": pa.array([2], pa.int64()), "score": ["high"]}), tmp_path / "other" / "o.parquet"
    )
    with pytest.raises(
        SchemaMismatchError, match="Column 'score' of table scores is float but the outputs hold string"
    ):
        get_sink("s3_parquet", table="scores", path=s3_url(bucket, "lake")).replace_partition(
            "q", [tmp_path / "other" / "o.parquet"], rejects
        )
    with pytest.raises(SchemaMismatchError, match=r"Dataset new does not exist .* create_table is off"):
        get_sink(
            "s3_parquet", table="new", path=s3_url(bucket, "lake"), create_table=False
        ).replace_partition("p", outputs, rejects)
    assert not keys(bucket, "lake/scores/batch_partition=q")


# --- athena -------------------------------------------------------------------------------------------


def athena_queries(since: set[str]) -> list[str]:
    client = aws_client("athena")
    ids = [i for i in client.list_query_executions()["QueryExecutionIds"] if i not in since]
    return [client.get_query_execution(QueryExecutionId=i)["QueryExecution"]["Query"] for i in ids]


def athena(bucket: str, **options):
    defaults = {
        "table": "analytics.scores",
        "location": f"s3://{bucket}/warehouse",
        "aws_conn_id": AWS_CONN_ID,
        "output_location": f"s3://{bucket}/athena-results/",
        "poll_interval": 0.01,
        "query_timeout": 10,
    }
    return get_sink("athena", **(defaults | options))


def test_athena_writes_a_new_version_and_points_the_partition_at_it(bucket: str, tmp_path) -> None:
    outputs, rejects = write_run_parts(tmp_path / "run", [[1, 2, 3], [4, 5]], rejected=frozenset({5}))
    before = set(aws_client("athena").list_query_executions()["QueryExecutionIds"])

    first = athena(bucket).replace_partition("2026-11-21", outputs, rejects)
    second = athena(bucket).replace_partition("2026-11-21", outputs, rejects)

    queries = athena_queries(before)
    base = f"s3://{bucket}/warehouse/scores"
    assert queries[0] == (
        "CREATE EXTERNAL TABLE IF NOT EXISTS `analytics`.`scores` "
        "(`row_id` bigint, `score` float, `label` string) "
        f"PARTITIONED BY (`batch_partition` string) STORED AS PARQUET LOCATION '{base}/'"
    )
    spec = "PARTITION (`batch_partition` = '2026-11-21')"
    assert queries[2:4] == [
        f"ALTER TABLE `analytics`.`scores` ADD IF NOT EXISTS {spec} LOCATION '{first.location}/'",
        f"ALTER TABLE `analytics`.`scores` {spec} SET LOCATION '{first.location}/'",
    ]
    assert queries[-3] == f"ALTER TABLE `analytics`.`scores` {spec} SET LOCATION '{second.location}/'"
    assert len(queries) == 12  # 2 CREATE + 2 x 2 ALTER per run
    assert second.location.startswith(f"{base}/batch_partition=2026-11-21/v")
    assert second.location != first.location
    # After the second run only its version is left: each row once at the location the partition points to.
    files = keys(bucket, "warehouse/scores/batch_partition=2026-11-21/")
    assert {f.rsplit("/", 2)[-2] for f in files} == {second.location.rsplit("/", 1)[-1]}
    assert read_ids([s3_url(bucket, f) for f in files]) == [1, 2, 3, 4]
    assert (second.rows, second.rejected) == (4, 1)


def test_athena_after_an_attempt_that_uploaded_half_its_parts(bucket: str, tmp_path, monkeypatch) -> None:
    athena(bucket).replace_partition("p", *write_run_parts(tmp_path / "old", [[1, 2]]))
    outputs, rejects = write_run_parts(tmp_path / "new", [[10, 11], [12]])
    before = set(aws_client("athena").list_query_executions()["QueryExecutionIds"])
    fail_on_call(monkeypatch, athena_sink, 2)
    with pytest.raises(OSError, match="interrupted"):
        athena(bucket).replace_partition("p", outputs, rejects)
    assert not [
        q for q in athena_queries(before) if "ALTER TABLE" in q
    ]  # the partition still points at the old rows

    monkeypatch.undo()
    result = athena(bucket).replace_partition("p", outputs, rejects)
    files = keys(bucket, "warehouse/scores/batch_partition=p/")
    assert {f.rsplit("/", 2)[-2] for f in files} == {result.location.rsplit("/", 1)[-1]}
    assert read_ids([s3_url(bucket, f) for f in files]) == [10, 11, 12]


def test_athena_checks_the_catalogued_table(bucket: str, tmp_path) -> None:
    glue = aws_client("glue")
    glue.create_database(DatabaseInput={"Name": "shop"})
    glue.create_table(
        DatabaseName="shop",
        TableInput={
            "Name": "scores",
            "StorageDescriptor": {
                "Columns": [{"Name": "row_id", "Type": "bigint"}, {"Name": "score", "Type": "double"}],
                "Location": f"s3://{bucket}/existing/scores/",
            },
            "PartitionKeys": [{"Name": "batch_partition", "Type": "string"}],
        },
    )
    outputs, rejects = write_run_parts(tmp_path / "run", [[1]])
    with pytest.raises(
        SchemaMismatchError,
        match=r"Column 'score' of table shop\.scores is double but the outputs hold float",
    ):
        athena(bucket, table="shop.scores").replace_partition("p", outputs, rejects)
    with pytest.raises(SchemaMismatchError, match="not in the Glue catalog and create_table is off"):
        athena(bucket, table="shop.absent", create_table=False).replace_partition("p", outputs, rejects)
    assert not keys(bucket, "existing/")


# --- redshift -----------------------------------------------------------------------------------------


def redshift(bucket: str, **options):
    defaults = {
        "table": "analytics.scores",
        "database": "dev",
        "cluster_identifier": "warehouse",
        "db_user": "loader",
        "iam_role": ROLE,
        "aws_conn_id": AWS_CONN_ID,
        "s3_prefix": f"s3://{bucket}/redshift-load",
    }
    return get_sink("redshift", **(defaults | options))


def submitted(statement_id: str) -> dict:
    return aws_client("redshift-data").describe_statement(Id=statement_id)


def manifest_ids(copy_statement: str) -> list[int]:
    url = copy_statement.split("FROM '", 1)[1].split("'", 1)[0]
    entries = json.loads(storage.read_text(storage.location(url, AWS_CONN_ID)))["entries"]
    return read_ids([storage.location(e["url"], AWS_CONN_ID) for e in entries])


def test_redshift_replaces_the_partition_in_one_batch(bucket: str, tmp_path) -> None:
    outputs, rejects = write_run_parts(tmp_path / "run", [[1, 2, 3], [4, 5]], rejected=frozenset({5}))
    first = redshift(bucket).submit("2026-11-21", outputs, rejects)
    second = redshift(bucket).submit("2026-11-21", outputs, rejects)

    for result in (first, second):
        statement = submitted(result)
        assert statement["Status"] == "STARTED"  # moto never runs it
        sqls = [s["QueryString"] for s in statement["SubStatements"]]
        assert sqls[:7] == [
            'CREATE TABLE IF NOT EXISTS "analytics"."scores" ("batch_partition" VARCHAR(128) NOT NULL, '
            '"row_id" BIGINT, "score" REAL, "label" VARCHAR(65535))',
            'LOCK "analytics"."scores"',
            'CREATE TEMP TABLE "batch_infer_stage_0" ("row_id" BIGINT, "score" REAL, "label" VARCHAR(65535))',
            sqls[3],
            'DELETE FROM "analytics"."scores" WHERE "batch_partition" = \'2026-11-21\'',
            'INSERT INTO "analytics"."scores" ("batch_partition", "row_id", "score", "label") '
            'SELECT \'2026-11-21\', "row_id", "score", "label" FROM "batch_infer_stage_0"',
            'DROP TABLE "batch_infer_stage_0"',
        ]
        assert sqls[3].startswith(
            f'COPY "batch_infer_stage_0" FROM \'s3://{bucket}/redshift-load/analytics.scores/'
        )
        assert sqls[3].endswith(f".manifest' IAM_ROLE '{ROLE}' FORMAT AS PARQUET MANIFEST")
        assert manifest_ids(sqls[3]) == [1, 2, 3, 4]  # each output row once, nothing else under the prefix
        assert manifest_ids(sqls[10]) == [5]
        assert len(sqls) == 14


def test_redshift_after_an_attempt_that_uploaded_half_its_parts(bucket: str, tmp_path, monkeypatch) -> None:
    outputs, rejects = write_run_parts(tmp_path / "run", [[1, 2], [3, 4], [5]])
    fail_on_call(monkeypatch, redshift_sink, 2)
    with pytest.raises(OSError, match="interrupted"):
        redshift(bucket).submit("p", outputs, rejects)

    monkeypatch.undo()
    result = redshift(bucket).submit("p", outputs, rejects)
    sqls = [s["QueryString"] for s in submitted(result)["SubStatements"]]
    assert manifest_ids(sqls[3]) == [1, 2, 3, 4, 5]  # the stray upload of the failed attempt is not listed


def test_redshift_waits_a_bounded_time(bucket: str, tmp_path) -> None:
    outputs, rejects = write_run_parts(tmp_path / "run", [[1]])
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"still STARTED after 1 s.*describe-statement"):
        redshift(bucket, wait_timeout=1, poll_interval=0.2).replace_partition("p", outputs, rejects)
    assert time.monotonic() - started < 10


def test_redshift_checks_an_existing_table_and_its_inputs(bucket: str, tmp_path, monkeypatch) -> None:
    outputs, rejects = write_run_parts(tmp_path / "run", [[1]])
    monkeypatch.setattr(
        redshift_sink.RedshiftSink,
        "_existing_columns",
        lambda self, hook, table: {
            "batch_partition": "varchar",
            "row_id": "int8",
            "score": "varchar",
            "label": "varchar",
        },
    )
    with pytest.raises(
        SchemaMismatchError,
        match=r"Column 'score' of table analytics\.scores is varchar but the outputs hold float4",
    ):
        redshift(bucket).replace_partition("p", outputs, rejects)
    with pytest.raises(ValueError, match="not an IAM role ARN"):
        redshift(bucket, iam_role="arn:aws:iam::123:role/x' --")
    with pytest.raises(ValueError, match="give s3_prefix="):
        redshift(bucket, s3_prefix=None).replace_partition("p", outputs, rejects)


def test_redshift_compares_column_names_as_redshift_stores_them(bucket: str, tmp_path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    outputs, rejects = write_run_parts(tmp_path / "run", [[1, 2]])
    mixed = []
    for index, part in enumerate(outputs):  # an output column named in mixed case, as a model may name it
        table = pq.read_table(part)
        path = tmp_path / f"mixed-{index}.parquet"
        names = ["row_id" if n == "row_id" else n.title() for n in table.column_names]
        pq.write_table(table.rename_columns(names), path)
        mixed.append(str(path))
    # Redshift folds every identifier to lower case: DescribeTable answers the names so.
    monkeypatch.setattr(
        redshift_sink.RedshiftSink,
        "_existing_columns",
        lambda self, hook, table: (
            {"batch_partition": "varchar", "row_id": "int8", "score": "float4", "label": "varchar"}
            if table == "analytics.scores"
            else None
        ),
    )
    result = redshift(bucket).submit("p", mixed, rejects)
    sqls = [s["QueryString"] for s in submitted(result)["SubStatements"]]
    assert 'INSERT INTO "analytics"."scores" ("batch_partition", "row_id", "Score", "Label")' in sqls[4]

    clash = tmp_path / "clash.parquet"
    both = pq.read_table(outputs[0])
    pq.write_table(both.append_column("Score", both.column("score")), clash)
    with pytest.raises(SchemaMismatchError, match=r"Columns 'score' and 'Score' are one column in Redshift"):
        redshift(bucket).submit("p", [str(clash)], rejects)


def test_a_second_writer_of_an_s3_parquet_partition_fails_clearly_and_changes_nothing(
    bucket: str, tmp_path
) -> None:
    from airflow_batch_infer.sinks.locks import PartitionLockedError, partition_lock

    dataset = get_sink("s3_parquet", table="scores", path=s3_url(bucket, "lake_locked"))
    dataset.replace_partition("p", *write_run_parts(tmp_path / "old", [[1, 2, 3]]))
    outputs, rejects = write_run_parts(tmp_path / "new", [[10, 11]], rejected=frozenset({11}))
    day = "lake_locked/scores/batch_partition=p/"
    before = keys(bucket, day)

    # Another run holds the partition (its lock was created first, with a conditional write).
    with partition_lock(
        dataset.table_location("scores"), "batch_partition", "p", description="the other run"
    ):
        assert keys(bucket, "lake_locked/scores/_locks/") == [
            "lake_locked/scores/_locks/batch_partition=p.lock"
        ]
        with pytest.raises(
            PartitionLockedError, match=r"batch_partition=p is being written by another run \(the other"
        ):
            dataset.replace_partition("p", outputs, rejects)
        assert keys(bucket, day) == before  # untouched: the old rows, as committed
        marker = json.loads(storage.read_text(s3_url(bucket, day + "_SUCCESS")))
        assert marker["rows"] == 3

    result = dataset.replace_partition("p", outputs, rejects)  # released: the next attempt goes through
    assert (result.rows, result.rejected, result.replaced) == (1, 1, 3)
    assert keys(bucket, "lake_locked/scores/_locks/") == []


def test_a_dead_writers_lock_is_taken_over_after_its_timeout(bucket: str, tmp_path) -> None:
    dataset = get_sink("s3_parquet", table="scores", path=s3_url(bucket, "lake_stale"), lock_timeout=60)
    lock = s3_url(bucket, "lake_stale/scores/_locks/batch_partition=p.lock")
    stale = {"token": "dead", "taken_at": time.time() - 3600, "host": "gone", "by": "a killed run"}
    storage.write_bytes(lock, json.dumps(stale).encode())
    result = dataset.replace_partition("p", *write_run_parts(tmp_path / "run", [[1, 2]]))
    assert result.rows == 2
    assert keys(bucket, "lake_stale/scores/_locks/") == []


def test_two_athena_writers_of_a_partition_do_not_interleave(bucket: str, tmp_path) -> None:
    from airflow_batch_infer.sinks.locks import PartitionLockedError, partition_lock

    outputs, rejects = write_run_parts(tmp_path / "run", [[1, 2]])
    sink = athena(bucket, table="analytics.locked")
    with partition_lock(
        storage.location(f"s3://{bucket}/warehouse/locked", AWS_CONN_ID), "batch_partition", "p"
    ):
        with pytest.raises(PartitionLockedError, match="being written by another run"):
            sink.replace_partition("p", outputs, rejects)
        assert keys(bucket, "warehouse/locked/batch_partition=p/") == []  # nothing written meanwhile
    assert sink.replace_partition("p", outputs, rejects).rows == 2


def test_redshift_never_reports_a_partition_before_the_commit(bucket: str, tmp_path) -> None:
    with pytest.raises(
        ValueError, match=r"wait_for_completion=False is not supported.*before Redshift commits"
    ):
        redshift(bucket, wait_for_completion=False)
    # moto's Data API leaves every statement STARTED: the persist fails at its bound, never succeeds.
    outputs, rejects = write_run_parts(tmp_path / "run", [[1]])
    with pytest.raises(TimeoutError, match=r"still STARTED"):
        redshift(bucket, wait_timeout=0.5, poll_interval=0.1).replace_partition("p", outputs, rejects)
