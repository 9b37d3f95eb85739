"""The demo DAG on a real CeleryExecutor cluster: two workers, PostgreSQL, Redis, local Triton servers.

The runs are triggered through the REST API, like a user would; the checks read the REST API, the
workers' own logs and the DuckDB warehouse. Each test ends with exact row counts: no row lost, none doubled.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import duckdb
import psutil
import pyarrow.parquet as pq
import pytest
from transactions_data import write_transactions

from airflow_batch_infer.runtimes.fleet import fleet_servers
from tests.conftest import processes_mentioning
from tests.distributed.cluster import CeleryCluster

pytestmark = pytest.mark.distributed

DAG_ID = "batch_inference_demo"
INFER = "batch_inference.infer"
RUN_TIMEOUT = 240
#: Slow enough to catch a chunk in the middle: 2,000 requests of 5 rows one at a time, ~6 s a chunk here
#: (each request waits out the dynamic batcher's 2 ms queue delay).
SLOW = {"request_rows": 5, "max_in_flight": 1}


@pytest.fixture(scope="module")
def demo(cluster: CeleryCluster) -> CeleryCluster:
    cluster.wait_for_dag(DAG_ID)
    return cluster


def write_input(cluster: CeleryCluster, name: str, rows: int) -> Path:
    folder = cluster.root / "inputs" / name
    write_transactions(folder, rows, files=4, row_group_rows=5_000)  # chunks end at row groups
    return folder


def trigger(cluster: CeleryCluster, name: str, conf: dict[str, Any]) -> str:
    return cluster.trigger(DAG_ID, conf, run_id=f"{name}_{cluster.token}")


def by_task(tis: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for ti in sorted(tis, key=lambda t: (t["task_id"], t["map_index"])):
        grouped.setdefault(ti["task_id"].split(".")[-1], []).append(ti)
    return grouped


def states(tis: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {task: [t["state"] for t in group] for task, group in by_task(tis).items()}


def partition_counts(cluster: CeleryCluster, table: str) -> dict[str, tuple[int, int, int]]:
    """Per partition: rows, distinct row ids, distinct transaction ids ({} before the table exists)."""
    database = cluster.batch_infer_home / "warehouse.duckdb"
    if not database.exists():
        return {}
    with duckdb.connect(str(database), read_only=True) as con:
        if not con.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_name = ?", [table]
        ).fetchall():
            return {}
        rows = con.execute(
            f"SELECT batch_partition, count(*), count(DISTINCT row_id), count(DISTINCT transaction_id) "
            f'FROM "{table}" GROUP BY 1 ORDER BY 1'
        ).fetchall()
        rejected = con.execute(f'SELECT count(*) FROM "{table}_rejects"').fetchone()
    assert rejected == (0,)
    return {p: (n, ids, tx) for p, n, ids, tx in rows}


def scored_ids(cluster: CeleryCluster, table: str, partition: str) -> list[int]:
    with duckdb.connect(str(cluster.batch_infer_home / "warehouse.duckdb"), read_only=True) as con:
        return [
            r[0]
            for r in con.execute(
                f'SELECT transaction_id FROM "{table}" WHERE batch_partition = ? ORDER BY 1', [partition]
            ).fetchall()
        ]


def run_folder(cluster: CeleryCluster, run_id: str) -> Path:
    """The run's staging folder (chunks, outputs, rejects, manifest)."""
    found = [p for p in (cluster.batch_infer_home / "staging" / DAG_ID).glob(f"*/{run_id}-*") if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def servers_left(cluster: CeleryCluster) -> list[int]:
    """tritonserver processes (and their Python stubs) started under this cluster's BATCH_INFER_HOME."""
    return processes_mentioning(cluster.batch_infer_home / "servers")


def assert_server_gone(cluster: CeleryCluster, tis: list[dict[str, Any]], wait: float = 0) -> None:
    """The run's server (as the infer tasks got it from the start task) is gone, with its shared memory."""
    # Mapped infer tasks that never started (a run marked failed mid-way) have no rendered fields.
    rendered = [t.get("rendered_fields") or {} for t in tis if t["task_id"] == INFER]
    fleets = [fields["server"] for fields in rendered if "server" in fields]
    assert fleets, "no infer task of the run rendered its server"
    deadline = time.monotonic() + wait
    while servers_left(cluster) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert servers_left(cluster) == []
    for server in fleet_servers(fleets[0]):
        pid = server.handle["pid"]
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert sorted(Path("/dev/shm").glob(f"{server.handle['shm_prefix']}*")) == []


def test_the_demo_spreads_its_chunks_over_both_celery_workers_and_both_servers(demo: CeleryCluster) -> None:
    rows, partition, table = 60_000, "2026-11-21", "scores_celery"
    source = write_input(demo, "spread", rows)
    run_id = trigger(
        demo,
        "spread",
        {"input_path": str(source), "chunk_rows": 10_000, "table": table, "partition": partition}
        | {"servers": 2},
    )

    state = demo.wait_for_run(DAG_ID, run_id, RUN_TIMEOUT)

    tis = demo.task_instances(DAG_ID, run_id)
    assert state == "success", states(tis)
    infer = by_task(tis)["infer"]
    assert [t["map_index"] for t in infer] == list(range(6))
    assert all(t["state"] == "success" and t["try_number"] == 1 for t in infer), infer
    # Each worker's log names the task instances it executed; the six chunks ran on both workers.
    workers = demo.worker_of(t["id"] for t in infer)
    assert all(len(names) == 1 for names in workers.values()), workers
    assert {names[0] for names in workers.values()} == {"w1", "w2"}, workers
    # The TI's hostname is the machine's name (``[core] hostname_callable``), not the Celery node name,
    # so on one machine it cannot tell the workers apart; it is set for every task instance.
    assert all(t["hostname"] for t in tis), [t["hostname"] for t in tis]
    # The start task returned two servers (through XCom); the chunks went to both, round robin.
    fleets = [t["rendered_fields"]["server"] for t in infer]
    servers = fleet_servers(fleets[0])
    assert len(servers) == 2
    assert all(fleet_servers(f) == servers for f in fleets)
    for t in infer:
        server = servers[t["map_index"] % 2]
        log = demo.task_log(DAG_ID, run_id, INFER, t["map_index"], 1).read_text(errors="replace")
        assert f"at {server.grpc_url} (server {server.handle['server_id']})," in log, t["map_index"]
    # Each server's own statistics, read by the stop task before it stopped them: both did work.
    stop_log = demo.task_log(DAG_ID, run_id, "batch_inference.stop_server", -1, 1).read_text(errors="replace")
    for server in servers:
        stopped = rf"Stopped the Triton server {server.handle['server_id']} at \S+ \(([\d,]+) rows"
        scored = re.search(stopped, stop_log)
        assert scored, stop_log[-3000:]
        assert int(scored.group(1).replace(",", "")) == rows // 2

    assert partition_counts(demo, table)[partition] == (rows, rows, rows)
    expected = sorted(pq.read_table(source, columns=["transaction_id"]).column(0).to_pylist())
    assert scored_ids(demo, table, partition) == expected
    assert_server_gone(demo, tis)


def _chunk_in_flight(cluster: CeleryCluster, run_id: str) -> dict[str, Any] | None:
    """A first-try infer task instance that is running and has started streaming its chunk."""
    for ti in cluster.task_instances(DAG_ID, run_id):
        if ti["task_id"] != INFER or ti["state"] != "running" or not ti["pid"] or ti["try_number"] != 1:
            continue
        log = cluster.task_log(DAG_ID, run_id, INFER, ti["map_index"], 1)
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(r'"event":"Chunk \d+: [\d,]+ rows from', text) and " done: " not in text:
            return ti
    return None


@pytest.mark.parametrize(
    ("victim", "partition"),
    [("task process", "2026-11-22"), ("celery pool process", "2026-11-23")],
    ids=["task-process", "celery-pool-process"],
)
def test_a_worker_process_killed_mid_chunk_is_retried_and_rewrites_only_its_chunk(
    demo: CeleryCluster, victim: str, partition: str
) -> None:
    """SIGKILL, in the middle of a chunk, either the task process (the TI's pid: its supervisor reports the
    failure) or also the Celery pool process above it that supervises it (Celery reports a lost worker)."""
    rows, table = 40_000, "scores_celery"
    source = write_input(demo, f"killed-{partition}", rows)
    conf = {"input_path": str(source), "chunk_rows": 10_000, "table": table, "partition": partition} | SLOW
    run_id = trigger(demo, f"killed_{partition}", conf)

    ti = demo.wait_for(
        lambda: _chunk_in_flight(demo, run_id),
        time.monotonic() + 120,
        "an infer task in the middle of its chunk",
        interval=0.2,
    )
    index = ti["map_index"]
    task = psutil.Process(ti["pid"])
    assert demo.owns(task.pid), f"pid {task.pid} is not a process of this cluster"
    targets = [task]
    if victim == "celery pool process":
        pool = task.parent()
        assert pool is not None
        assert pool.cmdline()[0].startswith("airflow supervisor"), pool.cmdline()
        targets.insert(0, pool)
    for proc in targets:
        proc.send_signal(signal.SIGKILL)
    killed_at = time.time()

    state = demo.wait_for_run(DAG_ID, run_id, RUN_TIMEOUT)

    tis = demo.task_instances(DAG_ID, run_id)
    assert state == "success", states(tis)
    infer = by_task(tis)["infer"]
    # The killed try is recorded as failed (up_for_retry until the retry started), the retry succeeded.
    tries = demo.tries(DAG_ID, run_id, INFER, index)
    assert [t["state"] for t in tries] == ["failed", "success"], tries
    first_log = demo.task_log(DAG_ID, run_id, INFER, index, 1).read_text(errors="replace")
    second_log = demo.task_log(DAG_ID, run_id, INFER, index, 2).read_text(errors="replace")
    assert f"Chunk {index} done" not in first_log  # it really died in the middle of its chunk
    assert f"Chunk {index} done" in second_log
    # Only the killed chunk ran again; every other chunk ran, and wrote its part, once.
    assert {t["map_index"]: t["try_number"] for t in infer} == {i: 2 if i == index else 1 for i in range(4)}
    folder = run_folder(demo, run_id)
    parts = sorted((folder / "outputs").glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert [pq.read_metadata(p).num_rows for p in parts] == [10_000] * 4
    assert parts[index].stat().st_mtime > killed_at

    assert partition_counts(demo, table)[partition] == (rows, rows, rows)
    expected = sorted(pq.read_table(source, columns=["transaction_id"]).column(0).to_pylist())
    assert scored_ids(demo, table, partition) == expected
    assert_server_gone(demo, tis)


def test_a_run_marked_failed_by_hand_still_stops_its_server(demo: CeleryCluster) -> None:
    rows, partition, table = 40_000, "2026-11-24", "scores_celery"
    source = write_input(demo, "aborted", rows)
    conf = {"input_path": str(source), "chunk_rows": 10_000, "table": table, "partition": partition}
    before = partition_counts(demo, table)
    run_id = trigger(demo, "aborted", conf | SLOW)

    demo.wait_for(
        lambda: _chunk_in_flight(demo, run_id),
        time.monotonic() + 120,
        "an infer task in the middle of its chunk",
        interval=0.2,
    )
    assert servers_left(demo) != []
    demo.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})

    state = demo.wait_for_run(DAG_ID, run_id, RUN_TIMEOUT)

    tis = demo.task_instances(DAG_ID, run_id)
    grouped = states(tis)
    # Airflow leaves the run running until its teardown is done, then infers the state from the leaves:
    # persist was skipped, so the run ends "success" (apache/airflow#45530 notes this side effect).
    assert state in {"failed", "success"}, grouped
    assert grouped["start_server"] == ["success"]
    assert grouped["stop_server"] == ["success"], grouped
    assert grouped["persist"] != ["success"], grouped
    assert "failed" in grouped["infer"], grouped
    assert_server_gone(demo, tis, wait=30)
    # Nothing of the aborted run reached the warehouse.
    assert partition_counts(demo, table) == before

    # The same partition again, to the end: every row once.
    rerun = trigger(demo, "aborted_again", conf)
    assert demo.wait_for_run(DAG_ID, rerun, RUN_TIMEOUT) == "success", states(
        demo.task_instances(DAG_ID, rerun)
    )
    assert partition_counts(demo, table) == before | {partition: (rows, rows, rows)}
    assert servers_left(demo) == []
