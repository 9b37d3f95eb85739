"""The s3_parquet sink's versions and pointer, on a local moto_server over HTTP and on a local folder.

Each run writes a new hidden version folder of both tables; one conditional write of the output table's
``_SUCCESS`` switches outputs and rejects together; older versions go after. Faults are injected by
replacing the sink's switch, or a deletion, with one that fails.
"""

from __future__ import annotations

import json
import os

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from airflow_batch_infer import storage
from airflow_batch_infer.sinks import get_sink, s3_versions
from airflow_batch_infer.sinks.s3_parquet import (
    CommitConflictError,
    S3ParquetSink,
    committed_files,
    committed_version,
    read_partition,
)
from tests.aws_fixtures import aws_conn, bucket, moto_endpoint, s3_url, write_run_parts

__all__ = ["aws_conn", "bucket", "moto_endpoint"]  # fixtures used by name

DAY = "batch_partition=2026-11-21"


@pytest.fixture(params=["s3", "local"])
def lake(request: pytest.FixtureRequest, tmp_path) -> str:
    """The datasets' root: a prefix of a new bucket on moto (the ``aws_test`` connection), or a folder."""
    if request.param == "s3":
        return s3_url(request.getfixturevalue("bucket"), "lake")
    return str(tmp_path / "lake")


def listing(folder: str) -> list[str]:
    """Every file below ``folder``, relative to it, with ``/`` separators."""
    start = len(folder.rstrip("/")) + 1
    return [path[start:].replace("\\", "/") for path in storage.list_files(folder)]


def pointer(lake: str, table: str = "scores") -> dict:
    return json.loads(storage.read_text(storage.join(lake, table, DAY, "_SUCCESS")))


def row_ids(table: pa.Table) -> list[int]:
    return sorted(table.column("row_id").to_pylist())


def sink(lake: str) -> S3ParquetSink:
    dataset = get_sink("s3_parquet", table="scores", path=lake)
    assert isinstance(dataset, S3ParquetSink)
    return dataset


def test_replacing_a_partition_twice_leaves_the_second_runs_rows_once(lake: str, tmp_path) -> None:
    first = sink(lake).replace_partition(
        "2026-11-21", *write_run_parts(tmp_path / "one", [[1, 2, 3], [4, 5]], rejected=frozenset({5}))
    )
    old = pointer(lake)["version"]
    second = sink(lake).replace_partition(
        "2026-11-21", *write_run_parts(tmp_path / "two", [[10, 11], [12]], rejected=frozenset({12}))
    )

    assert (first.rows, first.rejected, first.replaced) == (4, 1, 0)
    assert (second.rows, second.rejected, second.replaced) == (2, 1, 4)
    assert row_ids(read_partition(lake, "scores", "2026-11-21")) == [10, 11]
    assert row_ids(read_partition(lake, "scores_rejects", "2026-11-21")) == [12]
    new = pointer(lake)["version"]
    assert new != old
    parts = [f"{new}/part-00000.parquet", f"{new}/part-00001.parquet"]
    assert listing(storage.join(lake, "scores", DAY)) == sorted(["_SUCCESS", *parts])
    assert listing(storage.join(lake, "scores_rejects", DAY)) == parts  # the old version's objects are gone


def test_a_retry_with_the_same_parts_leaves_one_copy_of_the_rows(lake: str, tmp_path) -> None:
    outputs, rejects = write_run_parts(tmp_path / "run", [[1, 2], [3]], rejected=frozenset({3}))
    for _ in range(3):
        result = sink(lake).replace_partition("2026-11-21", outputs, rejects)
    assert (result.rows, result.rejected, result.replaced) == (2, 1, 2)
    assert row_ids(read_partition(lake, "scores", "2026-11-21")) == [1, 2]
    assert row_ids(read_partition(lake, "scores_rejects", "2026-11-21")) == [3]
    # The pointer and one version.
    assert len({name.split("/")[0] for name in listing(storage.join(lake, "scores", DAY))}) == 2


def test_a_local_dataset_links_the_parts_and_a_rewritten_part_leaves_it(tmp_path) -> None:
    """On one local filesystem a version's files are hard links to the run's parts: persist copies no byte.
    A retried infer task writes a new file over a part's name, which leaves the committed rows as they were.
    """
    lake = str(tmp_path / "lake")
    outputs, rejects = write_run_parts(tmp_path / "run", [[1, 2], [3]])
    sink(lake).replace_partition("2026-11-21", outputs, rejects)
    files = committed_files(lake, "scores", "2026-11-21")
    assert [os.path.samefile(f, p) for f, p in zip(files, outputs, strict=True)] == [True, True]
    write_run_parts(tmp_path / "run", [[7, 8], [9]])  # the run's infer tasks again, other rows
    assert row_ids(read_partition(lake, "scores", "2026-11-21")) == [1, 2, 3]


def test_a_failed_switch_leaves_the_previous_version_whole_and_the_next_run_succeeds(
    lake: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink(lake).replace_partition(
        "2026-11-21", *write_run_parts(tmp_path / "one", [[1, 2, 3], [4, 5]], rejected=frozenset({5}))
    )
    before = storage.read_text(storage.join(lake, "scores", DAY, "_SUCCESS"))
    committed = listing(storage.join(lake, "scores", DAY)), listing(storage.join(lake, "scores_rejects", DAY))
    seen: list[list[str]] = []

    def switch_fails(self: S3ParquetSink, pointer: str, body: bytes, expected: str | None) -> None:
        seen.append(listing(storage.join(lake, "scores_rejects", DAY)))  # the new version is written by now
        raise OSError("switch interrupted")

    monkeypatch.setattr(S3ParquetSink, "_switch", switch_fails)
    new_run = write_run_parts(tmp_path / "two", [[10, 11], [12, 13], [14]], rejected=frozenset({14}))
    with pytest.raises(OSError, match="switch interrupted"):
        sink(lake).replace_partition("2026-11-21", *new_run)

    assert len(seen[0]) == len(committed[1]) + 3  # both versions were there at the switch
    assert storage.read_text(storage.join(lake, "scores", DAY, "_SUCCESS")) == before
    assert row_ids(read_partition(lake, "scores", "2026-11-21")) == [1, 2, 3, 4]
    assert row_ids(read_partition(lake, "scores_rejects", "2026-11-21")) == [5]
    # The unfinished version is removed; the committed one is untouched.
    assert (
        listing(storage.join(lake, "scores", DAY)),
        listing(storage.join(lake, "scores_rejects", DAY)),
    ) == (committed)

    monkeypatch.undo()
    result = sink(lake).replace_partition("2026-11-21", *new_run)
    assert (result.rows, result.rejected, result.replaced) == (4, 1, 4)
    assert row_ids(read_partition(lake, "scores", "2026-11-21")) == [10, 11, 12, 13]
    assert row_ids(read_partition(lake, "scores_rejects", "2026-11-21")) == [14]


def test_outputs_and_rejects_switch_together_in_one_pointer(lake: str, tmp_path) -> None:
    for run, ids in (("one", [[1, 2], [3]]), ("two", [[7, 8, 9]])):
        sink(lake).replace_partition(
            "2026-11-21", *write_run_parts(tmp_path / run, ids, rejected=frozenset({3, 9}))
        )
        commit = pointer(lake)
        version = commit["version"]
        assert committed_version(lake, "scores", "2026-11-21")[0] == version
        assert committed_version(lake, "scores_rejects", "2026-11-21")[0] == version
        assert commit["rejects"]["table"] == "scores_rejects"
        assert commit["rejects"]["files"] == listing(storage.join(lake, "scores_rejects", DAY))
        assert all(f.startswith(f"{version}/") for f in commit["files"] + commit["rejects"]["files"])
        assert committed_files(lake, "scores_rejects", "2026-11-21") == [
            storage.join(lake, "scores_rejects", DAY, f) for f in commit["rejects"]["files"]
        ]
    assert (commit["rows"], commit["rejects"]["rows"]) == (2, 1)
    # The rejects table has no marker of its own: one write switches both.
    assert not storage.exists(storage.join(lake, "scores_rejects", DAY, "_SUCCESS"))


def test_plain_hive_discovery_never_sees_two_versions_the_readers_see_the_committed_one(
    lake: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink(lake).replace_partition("2026-11-21", *write_run_parts(tmp_path / "one", [[1, 2, 3], [4]]))
    remove = storage.remove

    def versions_stay(path: str) -> None:  # deleting the earlier versions fails (the locks still go)
        if "/_v" in str(path):
            raise OSError("delete refused")
        remove(path)

    monkeypatch.setattr(s3_versions.storage, "remove", versions_stay)
    result = sink(lake).replace_partition("2026-11-21", *write_run_parts(tmp_path / "two", [[10, 11], [12]]))
    monkeypatch.undo()
    assert result.rows == 3  # the run succeeded all the same
    folder = storage.join(lake, "scores", DAY)
    assert len({name.split("/")[0] for name in listing(folder)}) == 3  # the pointer and two versions

    fs, table_path = storage.filesystem(storage.join(lake, "scores"))
    arrow_fs = storage.arrow_filesystem(fs) if storage.is_remote(lake) else None
    assert ds.dataset(table_path, filesystem=arrow_fs, partitioning="hive").to_table().num_rows == 0
    rows = read_partition(lake, "scores", "2026-11-21")
    assert row_ids(rows) == [10, 11, 12]
    assert set(rows.column("batch_partition").to_pylist()) == {"2026-11-21"}
    with duckdb.connect() as con:
        files = storage.duckdb_readable(con, committed_files(lake, "scores", "2026-11-21"))
        found = con.execute(
            "SELECT row_id, batch_partition FROM read_parquet(?, hive_partitioning = true, "
            "hive_types = {'batch_partition': 'VARCHAR'}) ORDER BY 1",
            [files],
        ).fetchall()
    assert found == [(10, "2026-11-21"), (11, "2026-11-21"), (12, "2026-11-21")]

    sink(lake).replace_partition("2026-11-21", *write_run_parts(tmp_path / "three", [[20]]))
    assert len({name.split("/")[0] for name in listing(folder)}) == 2  # the next run removed the leftovers
    assert row_ids(read_partition(lake, "scores", "2026-11-21")) == [20]


def test_a_commit_over_a_newer_commit_is_refused(
    lake: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink(lake).replace_partition("2026-11-21", *write_run_parts(tmp_path / "one", [[1, 2]]))
    switch = S3ParquetSink._switch
    intruder = json.dumps({"rows": 0, "files": [], "version": "theirs"}).encode()

    def another_run_commits_first(
        self: S3ParquetSink, target: str, body: bytes, expected: str | None
    ) -> None:
        storage.write_bytes(target, intruder)  # a writer that took the lock over as stale, say
        switch(self, target, body, expected)

    monkeypatch.setattr(S3ParquetSink, "_switch", another_run_commits_first)
    # Replacing a commit (If-Match on S3), then a first commit (If-None-Match).
    for partition, rejects_before in (("2026-11-21", 1), ("2026-11-22", 0)):
        folder = f"batch_partition={partition}"
        with pytest.raises(CommitConflictError, match="changed since this run read it"):
            sink(lake).replace_partition(partition, *write_run_parts(tmp_path / partition, [[10]]))
        assert storage.read_text(storage.join(lake, "scores", folder, "_SUCCESS")) == intruder.decode()
        # The refused run's version is removed.
        assert len(listing(storage.join(lake, "scores_rejects", folder))) == rejects_before


def test_a_partition_of_the_unversioned_layout_is_read_then_replaced(lake: str, tmp_path) -> None:
    outputs, rejects = write_run_parts(tmp_path / "old", [[1, 2], [3]], rejected=frozenset({3}))
    for table, parts, rows in (("scores", outputs, 2), ("scores_rejects", rejects, 1)):
        folder = storage.join(lake, table, DAY)
        for index, part in enumerate(parts):
            storage.copy(part, storage.join(folder, f"part-{index:05d}.parquet"))
        files = [f"part-{index:05d}.parquet" for index in range(len(parts))]
        marker = {"table": table, "partition": "2026-11-21", "rows": rows, "files": files, "committed_at": ""}
        storage.write_bytes(storage.join(folder, "_SUCCESS"), json.dumps(marker).encode())
    assert row_ids(read_partition(lake, "scores", "2026-11-21")) == [1, 2]
    assert row_ids(read_partition(lake, "scores_rejects", "2026-11-21")) == [3]

    result = sink(lake).replace_partition("2026-11-21", *write_run_parts(tmp_path / "new", [[10]]))
    assert (result.rows, result.replaced) == (1, 2)
    assert row_ids(read_partition(lake, "scores", "2026-11-21")) == [10]
    assert read_partition(lake, "scores_rejects", "2026-11-21").num_rows == 0
    version = pointer(lake)["version"]
    assert listing(storage.join(lake, "scores_rejects", DAY)) == [f"{version}/part-00000.parquet"]
    assert listing(storage.join(lake, "scores", DAY)) == ["_SUCCESS", f"{version}/part-00000.parquet"]


def test_a_reader_whose_pointer_went_stale_reads_the_new_version(
    lake: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink(lake).replace_partition("2026-11-21", *write_run_parts(tmp_path / "one", [[1, 2]]))
    stale = committed_version(lake, "scores", "2026-11-21")
    sink(lake).replace_partition("2026-11-21", *write_run_parts(tmp_path / "two", [[10]]))
    assert not any(storage.exists(f) for f in stale[1])  # the files it names are deleted
    answers = [stale]

    def pointer_read_before_the_switch(*args: str) -> tuple[str | None, list[str]]:
        return answers.pop() if answers else committed_version(*args)

    monkeypatch.setattr(s3_versions, "committed_version", pointer_read_before_the_switch)
    assert row_ids(read_partition(lake, "scores", "2026-11-21")) == [10]
    assert not answers  # the stale pointer was read, and then the current one
