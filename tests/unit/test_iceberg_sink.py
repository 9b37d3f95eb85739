"""Iceberg sink: real pyiceberg, the embedded SQLite catalog and a local warehouse.

A partition is replaced by one snapshot, never doubled; rejects go to ``<table>_rejects``; new columns are
refused or added; a second writer of the same partition fails and commits nothing. The result is read back
with pyiceberg's scan and with DuckDB over the data files that the current snapshot lists: DuckDB's
``iceberg`` extension is downloaded on first use, which this machine cannot do (no extension repository is
reachable; the PyPI wheels that bundle it are built for DuckDB 1.4, not the 2.0 pinned here).
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_batch_infer.sinks import SchemaMismatchError, get_sink
from airflow_batch_infer.sinks.iceberg import PARTITION_PROPERTY, IcebergSink, PartitionConflictError
from airflow_batch_infer.sinks.iceberg_catalog import CATALOG_FILE, catalog_properties


def parts(folder: Path, ids: list[list[int]], **extra: list) -> list[Path]:
    """One output part per list of row ids: ``row_id``, ``score`` (and ``extra`` columns)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(ids):
        columns = {
            "row_id": pa.array(chunk, pa.int64()),
            "score": pa.array([x / 100 for x in chunk], pa.float32()),
            **{name: values[: len(chunk)] for name, values in extra.items()},
        }
        paths.append(folder / f"part-{i:05d}.parquet")
        pq.write_table(pa.table(columns), paths[-1])
    return paths


def rejects(folder: Path, ids: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rejects.parquet"
    reasons = pa.array(["bad input"] * len(ids), pa.string())
    pq.write_table(pa.table({"row_id": pa.array(ids, pa.int64()), "reject_reason": reasons}), path)
    return [path]


def sink(tmp_path: Path, **options: object) -> IcebergSink:
    made = get_sink("iceberg", table="scores", warehouse=str(tmp_path / "lake"), **options)
    assert isinstance(made, IcebergSink)
    return made


def rows(made: IcebergSink, table: str = "scores") -> list[tuple[str, int]]:
    """(partition, row id) of every row, sorted, read through pyiceberg's scan."""
    data = made.catalog().load_table(made.identifier(table)).scan().to_arrow()
    return sorted(
        zip(data.column("batch_partition").to_pylist(), data.column("row_id").to_pylist(), strict=True)
    )


def snapshots(made: IcebergSink, table: str = "scores") -> list[tuple[str, str | None]]:
    """(operation, partition property) of each snapshot, oldest first."""
    loaded = made.catalog().load_table(made.identifier(table))
    return [
        (s.summary.operation.value, s.summary.additional_properties.get(PARTITION_PROPERTY))
        for s in loaded.snapshots()
    ]


def test_replacing_a_partition_twice_leaves_the_second_runs_rows_once(tmp_path: Path) -> None:
    made = sink(tmp_path)
    first = made.replace_partition(
        "2026-11-21", parts(tmp_path / "a", [[1, 2, 3], [4, 5]]), rejects(tmp_path / "a", [6])
    )
    other = made.replace_partition(
        "2026-11-22", parts(tmp_path / "b", [[100, 101]]), rejects(tmp_path / "b", [])
    )
    second = made.replace_partition(
        "2026-11-21", parts(tmp_path / "c", [[7], [8, 9]]), rejects(tmp_path / "c", [])
    )

    assert (first.rows, first.rejected, first.replaced) == (5, 1, 0)
    assert (other.rows, other.rejected, other.replaced) == (2, 0, 0)
    assert (second.rows, second.rejected, second.replaced) == (3, 0, 5)
    assert rows(made) == [
        ("2026-11-21", 7),
        ("2026-11-21", 8),
        ("2026-11-21", 9),
        ("2026-11-22", 100),
        ("2026-11-22", 101),
    ]
    # One snapshot per replace of a table: pyiceberg calls the first an append (there was no table before),
    # the others overwrites, which drop the partition's files and add the new ones at once.
    assert snapshots(made) == [
        ("append", "2026-11-21"),
        ("overwrite", "2026-11-22"),
        ("overwrite", "2026-11-21"),
    ]
    summary = made.catalog().load_table(made.identifier("scores")).current_snapshot().summary
    assert (summary["deleted-records"], summary["added-records"], summary["total-records"]) == ("5", "3", "5")
    assert second.location.startswith((tmp_path / "lake").as_uri())
    assert (tmp_path / "lake" / CATALOG_FILE).is_file()


def test_rejects_go_to_their_own_table(tmp_path: Path) -> None:
    made = sink(tmp_path)
    made.replace_partition("p1", parts(tmp_path / "a", [[1, 2]]), rejects(tmp_path / "a", [3, 4]))
    made.replace_partition("p1", parts(tmp_path / "b", [[1, 2, 3]]), rejects(tmp_path / "b", [4]))
    made.replace_partition("p2", parts(tmp_path / "c", [[5]]), rejects(tmp_path / "c", []))

    assert rows(made, "scores_rejects") == [("p1", 4)]
    data = made.catalog().load_table(made.identifier("scores_rejects")).scan().to_arrow()
    assert data.column("reject_reason").to_pylist() == ["bad input"]
    assert "score" not in data.column_names
    assert rows(made) == [("p1", 1), ("p1", 2), ("p1", 3), ("p2", 5)]
    # p2 had no rejects before and none now: its replace commits no snapshot to the rejects table.
    assert snapshots(made, "scores_rejects") == [("append", "p1"), ("overwrite", "p1")]


def test_a_new_output_column_is_refused_by_default(tmp_path: Path) -> None:
    made = sink(tmp_path)
    made.replace_partition("p", parts(tmp_path / "a", [[1, 2]]), rejects(tmp_path / "a", []))
    wider = parts(tmp_path / "b", [[3]], label=pa.array(["x"]))

    with pytest.raises(
        SchemaMismatchError, match=r"no column 'label' \(string\).*allow_schema_evolution=True"
    ):
        made.replace_partition("p", wider, rejects(tmp_path / "b", []))

    assert rows(made) == [("p", 1), ("p", 2)]
    assert len(snapshots(made)) == 1
    assert not list((tmp_path / "lake").rglob("*.parquet"))[1:], "the refused run left no data file"


def test_a_new_output_column_is_added_when_allowed(tmp_path: Path) -> None:
    sink(tmp_path).replace_partition("p", parts(tmp_path / "a", [[1, 2]]), rejects(tmp_path / "a", []))
    made = sink(tmp_path, allow_schema_evolution=True)

    made.replace_partition(
        "q", parts(tmp_path / "b", [[3]], label=pa.array(["x"])), rejects(tmp_path / "b", [])
    )

    table = made.catalog().load_table(made.identifier("scores"))
    assert [f.name for f in table.schema().fields] == ["batch_partition", "row_id", "score", "label"]
    data = table.scan().to_arrow().sort_by("row_id")
    assert data.column("label").to_pylist() == [None, None, "x"]
    assert [s.summary.operation.value for s in table.snapshots()] == ["append", "overwrite"]
    assert table.snapshots()[-1].schema_id == table.schema().schema_id  # columns and rows: one commit


def test_a_column_of_another_type_is_named(tmp_path: Path) -> None:
    made = sink(tmp_path, allow_schema_evolution=True)
    made.replace_partition("p", parts(tmp_path / "a", [[1]]), rejects(tmp_path / "a", []))
    (tmp_path / "b").mkdir()
    pq.write_table(
        pa.table({"row_id": pa.array([2], pa.int64()), "score": ["high"]}), tmp_path / "b" / "p.parquet"
    )

    with pytest.raises(
        SchemaMismatchError,
        match=r"Column 'score' of Iceberg table scores is float but the outputs hold string",
    ):
        made.replace_partition("p", [tmp_path / "b" / "p.parquet"], rejects(tmp_path / "b", []))


def test_a_table_not_partitioned_by_the_column_is_refused(tmp_path: Path) -> None:
    made = sink(tmp_path)
    catalog = made.catalog()
    catalog.create_namespace("default")
    catalog.create_table(
        ("default", "scores"), schema=pa.schema([("batch_partition", pa.string()), ("row_id", pa.int64())])
    )

    with pytest.raises(SchemaMismatchError, match=r"not partitioned by identity\(batch_partition\)"):
        made.replace_partition("p", parts(tmp_path / "a", [[1]]), rejects(tmp_path / "a", []))


def test_create_table_off_refuses_a_missing_table(tmp_path: Path) -> None:
    with pytest.raises(SchemaMismatchError, match=r"default.scores does not exist .* create_table is off"):
        sink(tmp_path, create_table=False).replace_partition(
            "p", parts(tmp_path / "a", [[1]]), rejects(tmp_path / "a", [])
        )


def test_namespace_table_names_are_checked(tmp_path: Path) -> None:
    made = get_sink("iceberg", table="analytics.scores", warehouse=str(tmp_path / "lake"))
    made.replace_partition("p", parts(tmp_path / "a", [[1]]), rejects(tmp_path / "a", []))
    assert made.catalog().list_tables("analytics") == [
        ("analytics", "scores"),
        ("analytics", "scores_rejects"),
    ]
    for bad in ("a.b.c", "scores; drop", "x-y"):
        with pytest.raises(ValueError, match="Invalid table name"):
            get_sink("iceberg", table=bad, warehouse=str(tmp_path / "lake"))


def test_duckdb_reads_the_snapshots_data_files(tmp_path: Path) -> None:
    made = sink(tmp_path)
    made.replace_partition("p1", parts(tmp_path / "a", [[1, 2, 3]]), rejects(tmp_path / "a", []))
    made.replace_partition("p2", parts(tmp_path / "b", [[4]]), rejects(tmp_path / "b", []))
    made.replace_partition("p1", parts(tmp_path / "c", [[5, 6]]), rejects(tmp_path / "c", []))
    table = made.catalog().load_table(made.identifier("scores"))
    live = [task.file.file_path.removeprefix("file://") for task in table.scan().plan_files()]
    on_disk = [
        str(p) for p in (tmp_path / "lake").rglob("data/*/*.parquet") if "scores_rejects" not in str(p)
    ]
    assert len(live) == 2
    assert len(on_disk) == 3  # the replaced file stays for older snapshots (time travel)

    with duckdb.connect() as con:
        counts = con.execute(
            "SELECT batch_partition, count(*), sum(row_id) FROM read_parquet($files) GROUP BY 1 ORDER BY 1",
            {"files": live},
        ).fetchall()
    assert counts == [("p1", 2, 11), ("p2", 1, 4)]


def test_a_second_writer_of_the_same_partition_fails_and_commits_nothing(tmp_path: Path) -> None:
    first, second = sink(tmp_path), sink(tmp_path)
    first.replace_partition("p", parts(tmp_path / "old", [[1, 2]]), rejects(tmp_path / "old", []))
    write = second._write

    def write_while_another_run_commits(*args: object) -> None:
        write(*args)  # this run's files are written; its commit has not happened yet
        if args[0].table.name()[-1] == "scores":
            first.replace_partition(
                "p", parts(tmp_path / "other", [[7, 8, 9]]), rejects(tmp_path / "other", [])
            )

    second._write = write_while_another_run_commits  # type: ignore[method-assign]
    with pytest.raises(
        PartitionConflictError, match=r"batch_partition=p of Iceberg table scores was written by another"
    ):
        second.replace_partition("p", parts(tmp_path / "new", [[4, 5]]), rejects(tmp_path / "new", []))

    assert rows(first) == [("p", 7), ("p", 8), ("p", 9)]
    table = first.catalog().load_table(first.identifier("scores"))
    live = {t.file.file_path.removeprefix("file://") for t in table.scan().plan_files()}
    on_disk = {str(p) for p in (tmp_path / "lake" / "default" / "scores" / "data").rglob("*.parquet")}
    assert len(on_disk - live) == 1, (
        "only the first run's replaced file is left; the refused run's were deleted"
    )


def test_writers_of_different_partitions_both_commit(tmp_path: Path) -> None:
    first, second = sink(tmp_path), sink(tmp_path)
    first.replace_partition("p", parts(tmp_path / "old", [[1]]), rejects(tmp_path / "old", []))
    write = second._write

    def write_while_another_run_commits(*args: object) -> None:
        write(*args)
        if args[0].table.name()[-1] == "scores":
            first.replace_partition("q", parts(tmp_path / "q", [[2, 3]]), rejects(tmp_path / "q", []))

    second._write = write_while_another_run_commits  # type: ignore[method-assign]
    second.replace_partition("p", parts(tmp_path / "new", [[4, 5]]), rejects(tmp_path / "new", []))

    assert rows(first) == [("p", 4), ("p", 5), ("q", 2), ("q", 3)]


def test_a_connection_names_the_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    warehouse = tmp_path / "shared"
    warehouse.mkdir()
    extra = {"type": "sql", "uri": f"sqlite:///{warehouse / 'cat.db'}", "warehouse": warehouse.as_uri()}
    monkeypatch.setenv("AIRFLOW_CONN_ICEBERG_SQL", json.dumps({"conn_type": "generic", "extra": extra}))
    monkeypatch.setenv(
        "AIRFLOW_CONN_ICEBERG_REST",
        json.dumps(
            {
                "conn_type": "generic",
                "host": "https://cat.example",
                "login": "id",
                "password": "s",
                "extra": {"type": "rest"},
            }
        ),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_LAKE",
        json.dumps(
            {"conn_type": "aws", "login": "AKID", "password": "SECRET", "extra": {"region_name": "eu-west-1"}}
        ),
    )

    made = get_sink("iceberg", table="scores", catalog_conn_id="iceberg_sql")
    made.replace_partition("p", parts(tmp_path / "a", [[1, 2]]), rejects(tmp_path / "a", []))
    assert (warehouse / "cat.db").is_file()
    assert list((warehouse / "default" / "scores").rglob("*.parquet"))
    assert rows(made) == [("p", 1), ("p", 2)]

    assert catalog_properties(catalog_conn_id="iceberg_rest") == {
        "type": "rest",
        "uri": "https://cat.example",
        "credential": "id:s",
    }
    glue = catalog_properties(catalog={"type": "glue"}, aws_conn_id="aws_lake", warehouse="s3://lake/wh")
    assert glue == {
        "type": "glue",
        "client.access-key-id": "AKID",
        "client.secret-access-key": "SECRET",
        "client.region": "eu-west-1",
        "warehouse": "s3://lake/wh",
    }


def test_the_embedded_catalog_needs_a_local_warehouse() -> None:
    with pytest.raises(ValueError, match=r"must be a local folder, not s3://lake/wh"):
        catalog_properties(warehouse="s3://aws_lake@lake/wh")
