"""A site's own sinks and runtimes: by class path or by entry point, without forking the package."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_batch_infer.plugins import PluginNotFoundError
from airflow_batch_infer.runtimes import get_runtime
from airflow_batch_infer.runtimes.local import LocalTritonRuntime
from airflow_batch_infer.sinks import get_sink
from tests.plugin_sink import ParquetFolderSink


class SiteRuntime(LocalTritonRuntime):
    """A site's runtime: the local one with its own defaults."""

    name = "site_local"

    def __init__(self, **options) -> None:
        super().__init__(**{"startup_timeout": 30, **options})


def _install_plugins(site: Path) -> None:
    """A distribution that registers entry points, as `pip install my-site-plugins` would leave it."""
    info = site / "my_site_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-site-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[airflow_batch_infer.sinks]\n"
        "parquet_folder = tests.plugin_sink:ParquetFolderSink\n"
        "broken = tests.plugin_sink:NoSuchSink\n"
        "[airflow_batch_infer.runtimes]\n"
        "site_local = tests.unit.test_plugins:SiteRuntime\n"
    )


@pytest.fixture
def site_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_plugins(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_a_sink_by_class_path_writes_its_partition(tmp_path: Path) -> None:
    part = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"row_id": [1, 2, 3], "score": [0.1, 0.5, 0.9]}), part)
    empty = tmp_path / "rejects-00000.parquet"
    pq.write_table(pa.table({"row_id": pa.array([], pa.int64()), "reason": pa.array([], pa.string())}), empty)

    sink = get_sink("tests.plugin_sink:ParquetFolderSink", table="scores", folder=str(tmp_path / "lake"))

    assert isinstance(sink, ParquetFolderSink)
    result = sink.replace_partition("2026-11-21", [part], [empty])
    assert (result.rows, result.rejected) == (3, 0)
    written = pq.read_table(tmp_path / "lake" / "scores" / "batch_partition=2026-11-21.parquet")
    assert written.column("score").to_pylist() == [0.1, 0.5, 0.9]


def test_a_sink_and_a_runtime_by_entry_point(site_plugins) -> None:
    sink = get_sink("parquet_folder", table="scores", folder="/tmp/x")
    assert isinstance(sink, ParquetFolderSink)
    runtime = get_runtime("site_local", work_root="/tmp/servers")
    assert isinstance(runtime, SiteRuntime)
    assert (runtime.startup_timeout, str(runtime.work_root)) == (30.0, "/tmp/servers")


def test_a_name_that_is_nowhere_fails_for_good_and_lists_what_exists(site_plugins) -> None:
    with pytest.raises(
        PluginNotFoundError, match=r"Unknown sink 'bigquery'.*'duckdb'.*'parquet_folder'"
    ) as err:
        get_sink("bigquery", table="t")
    assert isinstance(err.value, AirflowFailException)  # a retry cannot make it exist
    with pytest.raises(PluginNotFoundError, match=r"entry point 'broken'.*cannot be loaded"):
        get_sink("broken", table="t")
    with pytest.raises(PluginNotFoundError, match=r"Unknown Triton runtime 'slurm'.*'site_local'"):
        get_runtime("slurm")


def test_a_class_path_is_checked_before_use() -> None:
    with pytest.raises(PluginNotFoundError, match=r"Cannot import module 'my_pkg.sinks'"):
        get_sink("my_pkg.sinks:BigQuerySink", table="t")
    with pytest.raises(PluginNotFoundError, match=r"has no 'NoSuchSink'"):
        get_sink("tests.plugin_sink:NoSuchSink", table="t")
    with pytest.raises(
        PluginNotFoundError, match=r"not a subclass of airflow_batch_infer.sinks.base.WarehouseSink"
    ):
        get_sink("tests.unit.test_plugins:SiteRuntime", table="t")
    with pytest.raises(PluginNotFoundError, match=r"not a subclass of .*TritonRuntime"):
        get_runtime("tests.plugin_sink:ParquetFolderSink")
    with pytest.raises(TypeError, match=r"Sink 'tests.plugin_sink:ParquetFolderSink'.*folder"):
        get_sink("tests.plugin_sink:ParquetFolderSink", table="t")
