"""The demo DAG run end to end: under ``airflow dags test`` and under a real scheduler (LocalExecutor)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from e2e_common import (
    BENCH,
    DAG_ID,
    LOGICAL_DATE,
    REPO,
    WARMUP_ROWS,
    check_output,
    ensure_input,
    sample_ok,
    with_sink_home,
)


def tree_env(tree: Path) -> dict[str, str]:
    """Settings that make Airflow run ``tree``'s DAGs and package (this checkout, or a baseline worktree).

    A baseline gets a server environment of its own: an older revision may rebuild a shared one to its own
    requirements or marker, which this tree's runtime then refuses as out of date.
    """
    env = {"AIRFLOW__CORE__DAGS_FOLDER": str(tree / "dags"), "PYTHONPATH": str(tree)}
    if tree != REPO:
        env["BATCH_INFER_TRITON_ENV"] = str(tree.with_name(f"{tree.name}-server-env"))
    return env


def base_env(home: Path, airflow_home: Path, tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "BATCH_INFER_HOME": str(home),
            "BATCH_INFER_TRITON_ENV": os.environ["BATCH_INFER_TRITON_ENV"],
        }
    )
    env.update(tree_env(tree))
    return env


def steps_from_tis(tis: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of each step (first start to last end over its task instances) and of the whole run."""
    spans: dict[str, list[float]] = {}
    for ti in tis:
        step = ti["task_id"].split(".")[-1]
        if ti.get("start_date") and ti.get("end_date"):
            spans.setdefault(step, []).extend([_ts(ti["start_date"]), _ts(ti["end_date"])])
    steps = {step: max(v) - min(v) for step, v in spans.items()}
    every = [t for v in spans.values() for t in v]
    steps["tasks_wall"] = max(every) - min(every) if every else 0.0
    if "stage" in spans and "persist" in spans:
        steps["data_path"] = max(spans["persist"]) - min(spans["stage"])
    return steps


def _ts(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def run_dags_test(source: Path, rows: int, tree: Path, conf: dict[str, Any]) -> dict[str, Any]:
    """``airflow dags test`` of ``tree``'s demo DAG; step times from the SQLite metadata database."""
    import sqlite3

    root = BENCH / f"dags-test-{tree.name}"
    home, airflow_home = root / "home", root / "airflow"
    shutil.rmtree(home, ignore_errors=True)
    conf = with_sink_home(conf, home)
    env = base_env(home, airflow_home, tree)
    airflow = str(Path(sys.executable).with_name("airflow"))
    if not (airflow_home / "airflow.db").exists():
        airflow_home.mkdir(parents=True, exist_ok=True)
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    started = time.monotonic()
    done = subprocess.run(
        [airflow, "dags", "test", DAG_ID, LOGICAL_DATE, "-c", json.dumps(conf)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - started
    (root / "dags-test.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"airflow dags test failed:\n{(done.stdout + done.stderr)[-4000:]}")
    with sqlite3.connect(airflow_home / "airflow.db") as db:
        run_id = db.execute(
            "SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (DAG_ID,)
        ).fetchone()[0]
        tis = [
            {"task_id": t, "start_date": s, "end_date": e}
            for t, s, e in db.execute(
                "SELECT task_id, start_date, end_date FROM task_instance WHERE dag_id = ? AND run_id = ?",
                (DAG_ID, run_id),
            )
        ]
    check = check_output(home, conf, rows)
    check["sample_ok"] = sample_ok(source, check["sample"])
    return {"command_s": wall, "steps": steps_from_tis(tis), "check": check, "chunks": _chunks(tis)}


def _chunks(tis: list[dict[str, Any]]) -> int:
    return sum(1 for ti in tis if ti["task_id"].endswith(".infer"))


class RssSampler(threading.Thread):
    """Peak RSS (``VmHWM``) of each task process (``airflow worker -- <ti id>``), sampled every 0.1 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[str, float] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.1):
            for proc in Path("/proc").glob("[0-9]*"):
                with contextlib.suppress(OSError):
                    cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if not cmdline.startswith("airflow worker -- "):
                        continue
                    ti_id = cmdline.split("-- ", 1)[1].strip()
                    for line in (proc / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            mb = int(line.split()[1]) / 1024
                            self.peaks[ti_id] = max(self.peaks.get(ti_id, 0.0), mb)

    def finish(self) -> None:
        self._done.set()
        self.join()


def run_scheduler(
    source: Path, rows: int, tree: Path, conf: dict[str, Any], idle_sleep: float | None = None
) -> dict[str, Any]:
    """``tree``'s demo DAG under a scheduler with the LocalExecutor (parallelism 2), triggered by the REST
    API.

    :param idle_sleep: the scheduler's ``scheduler_idle_sleep_time`` (default: Airflow's, 1 s).
    """
    from tests.distributed.cluster import CeleryCluster, services_missing

    missing = services_missing()
    if missing:
        raise RuntimeError(f"The scheduler run needs PostgreSQL: {missing}")
    root = BENCH / f"scheduler-{tree.name}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    settings = tree_env(tree)
    if idle_sleep is not None:
        settings["AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME"] = str(idle_sleep)
    cluster = CeleryCluster(root, executor="LocalExecutor", parallelism=2, extra_env=settings)
    conf = with_sink_home(conf, cluster.batch_infer_home)
    sampler = RssSampler()
    try:
        cluster.start()
        cluster.wait_for_dag(DAG_ID)  # and unpaused
        # A deployed api-server is warm: its first execution API call here took 5 s (and was retried).
        warm = conf | {"input_path": str(ensure_input(WARMUP_ROWS)), "partition": "warm-up"}
        warm_state = cluster.wait_for_run(
            DAG_ID, cluster.trigger(DAG_ID, warm, run_id="warm_up"), timeout=600
        )
        if warm_state != "success":
            raise RuntimeError(f"The warm-up run ended {warm_state}.")
        sampler.start()
        run_id = cluster.trigger(DAG_ID, conf, run_id=f"bench_{int(time.time())}")
        state = cluster.wait_for_run(DAG_ID, run_id, timeout=1800)
        sampler.finish()
        run = cluster.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
        tis = cluster.task_instances(DAG_ID, run_id)
        if state != "success":
            raise RuntimeError(
                f"The scheduler run ended {state}: {[(t['task_id'], t['state']) for t in tis]}"
            )
        check = check_output(cluster.batch_infer_home, conf, rows)
        check["sample_ok"] = sample_ok(source, check["sample"])
        by_id = {t["id"]: f"{t['task_id'].split('.')[-1]}[{t.get('map_index', -1)}]" for t in tis}
        peaks = {by_id[ti_id]: round(mb) for ti_id, mb in sampler.peaks.items() if ti_id in by_id}
        steps = steps_from_tis(tis)
        steps["run_wall"] = _ts(run["end_date"]) - _ts(run["start_date"])
        held = slot_holds(root / "components" / "scheduler.log", tis)
        return {"steps": steps, "check": check, "rss_mb": peaks, "chunks": _chunks(tis), "slot_held_s": held}
    finally:
        if sampler.is_alive():
            sampler.finish()
        cluster.stop()


def slot_holds(scheduler_log: Path, tis: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds each task's executor slot stayed taken after the task ended: from its end date to the
    supervisor's ``Workload finished`` line in the scheduler's log (the LocalExecutor's workers log there)."""
    ends = {t["id"]: (f"{t['task_id'].split('.')[-1]}[{t.get('map_index', -1)}]", t["end_date"]) for t in tis}
    held = {}
    for line in scheduler_log.read_text(errors="replace").splitlines():
        found = re.match(r"(\S+) \[info\s*\] Workload finished .*workload_id=(\S+)", line)
        if found and found.group(2) in ends and ends[found.group(2)][1]:
            name, end = ends[found.group(2)]
            held[name] = round(_ts(found.group(1)) - _ts(end), 2)
    return held


def baseline_tree(revision: str) -> Path:
    """A worktree of ``revision`` under ``.bench/``, made once (its DAGs and package; this tree's venv), and
    its own server environment, built (or checked) by that revision's runtime: a task never builds one."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", revision], capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = REPO / ".bench" / f"tree-{sha}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), sha], check=True)
        # Byte-compiled like this checkout (make setup): neither side pays for compiling its imports.
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(tree / "airflow_batch_infer"), str(tree / "dags")]
        )
    server_env = tree_env(tree)["BATCH_INFER_TRITON_ENV"]
    prepare = [sys.executable, "-m", "airflow_batch_infer.runtimes.local", "prepare", "--server-env"]
    subprocess.run(
        [*prepare, server_env], env=os.environ | {"PYTHONPATH": str(tree)}, check=True, capture_output=True
    )
    return tree
