"""A real Airflow 3 cluster for the distributed tests: CeleryExecutor, PostgreSQL, Redis, two workers.

``make bench-e2e`` runs it with the LocalExecutor instead (``executor="LocalExecutor"``: no Celery
workers, no Redis), as a scheduler on one machine would.

:class:`CeleryCluster` starts every component as its own process (scheduler, api-server, dag-processor,
triggerer, two ``airflow celery worker``) on a private ``AIRFLOW_HOME`` and ``BATCH_INFER_HOME`` under a
temporary folder, with a fresh PostgreSQL database and a Redis database number of its own, and stops all
of it again: every process it started, their descendants (task processes, tritonserver) and the database.

The cleanup finds what the cluster started, and only that: the components' process trees (task processes
run in process groups of their own), and processes that left the tree (tritonserver, in a session of its
own, outlives the task that started it) by this cluster's folder in their command line or by
``ABI_CLUSTER_TOKEN=<random>`` in their environment.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
#: Redis database numbers the cluster may claim (one per cluster, claimed with SET NX, flushed at the end).
REDIS_DBS = range(5, 16)
TOKEN_ENV = "ABI_CLUSTER_TOKEN"
TERMINAL_RUN_STATES = {"success", "failed"}


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def services_missing() -> str | None:
    """Why the cluster cannot start here (PostgreSQL or Redis not reachable), or ``None``."""
    for name, host, port in (("PostgreSQL", PG_HOST, PG_PORT), ("Redis", REDIS_HOST, REDIS_PORT)):
        try:
            socket.create_connection((host, port), timeout=2).close()
        except OSError as error:
            return f"{name} is not reachable at {host}:{port} ({error})"
    return None


def processes_with_token(token: str) -> list[int]:
    """Pids of live (non-zombie) processes whose environment holds ``ABI_CLUSTER_TOKEN=token``."""
    needle = f"{TOKEN_ENV}={token}".encode()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z":
            pids.append(int(proc.name))
    return pids


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Component:
    """One started Airflow process: its name, command, extra environment and log file."""

    name: str
    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None


class ClusterError(AssertionError):
    """The cluster did not get where it should, with the components' log tails in the message."""


class CeleryCluster:
    """Airflow (CeleryExecutor) with two Celery workers, PostgreSQL metadata database and Redis broker.

    :param root: an empty temporary folder for ``AIRFLOW_HOME``, ``BATCH_INFER_HOME`` and the logs.
    :param workers: number of Celery workers (``w1``, ``w2``, ...).
    :param concurrency: task slots per worker (``-c``).
    :param executor: ``CeleryExecutor``, or ``LocalExecutor`` (the scheduler runs the tasks; no workers).
    :param parallelism: ``[core] parallelism``.
    :param extra_env: more settings for every component.
    """

    def __init__(
        self,
        root: Path,
        workers: int = 2,
        concurrency: int = 2,
        executor: str = "CeleryExecutor",
        parallelism: int = 8,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.executor = executor
        self.parallelism = parallelism
        self.extra_env = dict(extra_env or {})
        if executor != "CeleryExecutor":
            workers = 0
        self.airflow_home = root / "airflow"
        self.batch_infer_home = root / "home"
        self.logs = root / "components"
        self.token = secrets.token_hex(8)
        self.db_name = f"abi_airflow_{self.token}"
        self.redis_db: int | None = None
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.workers = [f"w{i + 1}" for i in range(workers)]
        self.concurrency = concurrency
        self.ports = {"worker_log_server": free_port(), "trigger_log_server": free_port()}
        self.secret_key = secrets.token_hex(16)
        self.components: list[Component] = []
        self._http: httpx.Client | None = None
        self._db_created = False

    # ------------------------------------------------------------------ configuration

    @property
    def sql_alchemy_conn(self) -> str:
        return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.db_name}"

    def env(self) -> dict[str, str]:
        """The environment of every component (docs/how-to/scale-out.md shows the same settings)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(
            {
                TOKEN_ENV: self.token,
                "AIRFLOW_HOME": str(self.airflow_home),
                "BATCH_INFER_HOME": str(self.batch_infer_home),
                "BATCH_INFER_TRITON_ENV": os.environ.get(
                    "BATCH_INFER_TRITON_ENV", str(REPO / ".data" / "triton-server-env")
                ),
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__EXECUTOR": self.executor,
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__FERNET_KEY": _fernet_key(self.token),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
                # Retries come quickly (the demo's infer tasks have retries=2).
                "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "2",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
                "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}",
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.db_name}",
                "AIRFLOW__API__BASE_URL": self.api_url,
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__SECRET_KEY": self.secret_key,
                "AIRFLOW__API_AUTH__JWT_SECRET": f"jwt-{self.token}",
                # A task whose supervisor vanished (worker lost) is failed, then retried, within ~30 s.
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
                # Ports of their own, so that clusters of several test sessions can run side by side.
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.ports["worker_log_server"]),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.ports["trigger_log_server"]),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env | self.extra_env

    # ------------------------------------------------------------------ start / stop

    def start(self, timeout: float = 120) -> None:
        """Create the database, claim a Redis db, migrate, start every component, wait until ready."""
        for folder in (self.airflow_home, self.batch_infer_home, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        self._create_database()
        if self.workers:
            self._claim_redis_db()
        airflow = str(Path(sys.executable).with_name("airflow"))
        migrate = subprocess.run(
            [airflow, "db", "migrate"],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        (self.logs / "migrate.log").write_text(migrate.stdout + migrate.stderr)
        if migrate.returncode != 0:
            raise ClusterError(f"airflow db migrate failed:\n{(migrate.stdout + migrate.stderr)[-3000:]}")
        self.components = [
            Component(
                "api-server",
                [airflow, "api-server", "--port", str(self.api_port), "--workers", "1"],
                self.logs / "api-server.log",
            ),
            Component("scheduler", [airflow, "scheduler"], self.logs / "scheduler.log"),
            Component("dag-processor", [airflow, "dag-processor"], self.logs / "dag-processor.log"),
            Component("triggerer", [airflow, "triggerer"], self.logs / "triggerer.log"),
        ]
        for name in self.workers:
            self.components.append(
                Component(
                    name,
                    [airflow, "celery", "worker", "-H", f"{name}@%h", "-c", str(self.concurrency)],
                    self.logs / f"{name}.log",
                    {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())},
                )
            )
        base = self.env()
        for comp in self.components:
            with open(comp.log, "wb") as out:
                comp.proc = subprocess.Popen(
                    comp.args,
                    env=base | comp.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.root,
                    start_new_session=True,
                )
        deadline = time.monotonic() + timeout
        self.wait_for(lambda: self._api_healthy(), deadline, "the api-server to answer")
        for name in self.workers:
            self.wait_for(
                lambda name=name: re.search(
                    rf"{name}@\S+ ready\.", (self.logs / f"{name}.log").read_text(errors="replace")
                ),
                deadline,
                f"Celery worker {name} to be ready",
            )

    def stop(self) -> None:
        """Stop every component and whatever they started; drop the database; flush the Redis db."""
        with contextlib.suppress(Exception):
            if self._http is not None:
                self._http.close()
        tracked = [c.proc for c in self.components if c.proc is not None and c.proc.poll() is None]
        # Task processes run in process groups of their own, tritonserver in a session of its own.
        descendants = self.descendants()
        for proc in tracked:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        # Most stop within 3 s; the triggerer takes ~12 s on SIGTERM, which a test run need not wait for.
        deadline = time.monotonic() + 6
        for proc in tracked:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in tracked:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for _ in range(5):
            left = [p for p in descendants if _alive(p)]
            left += [psutil.Process(pid) for pid in self.stray_processes() if psutil.pid_exists(pid)]
            if not left:
                break
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    proc.kill()  # psutil checks that the pid still names the same process
            time.sleep(0.5)
        self._drop_database()
        self._release_redis_db()

    def descendants(self) -> list[psutil.Process]:
        """Every live process below the components (supervisors, task processes, serve-logs, ...)."""
        found = []
        for comp in self.components:
            if comp.proc is None:
                continue
            with contextlib.suppress(psutil.Error):
                found.extend(psutil.Process(comp.proc.pid).children(recursive=True))
        return found

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` runs below one of this cluster's components."""
        roots = {c.proc.pid for c in self.components if c.proc is not None}
        try:
            return any(parent.pid in roots for parent in psutil.Process(pid).parents())
        except psutil.Error:
            return False

    def stray_processes(self) -> list[int]:
        """Processes that left the components' tree: tritonserver and its stubs (their command line names
        this cluster's folder), or any whose environment still holds the cluster's token (processes that
        set their title, as Airflow's and Celery's do, overwrite what /proc shows of their environment)."""
        pids = set(processes_with_token(self.token))
        for proc in psutil.process_iter(["cmdline", "status"]):
            with contextlib.suppress(psutil.Error):
                if proc.info["status"] != psutil.STATUS_ZOMBIE and str(self.root) in " ".join(
                    proc.info["cmdline"] or ()
                ):
                    pids.add(proc.pid)
        pids.discard(os.getpid())
        return sorted(pids)

    # ------------------------------------------------------------------ services

    def _create_database(self) -> None:
        import psycopg2

        with contextlib.closing(
            psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
        ) as con:
            con.autocommit = True
            con.cursor().execute(f'CREATE DATABASE "{self.db_name}"')
        self._db_created = True

    def _drop_database(self) -> None:
        if not self._db_created:
            return
        import psycopg2

        with contextlib.closing(
            psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
        ) as con:
            con.autocommit = True
            con.cursor().execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        self._db_created = False

    def _claim_redis_db(self) -> None:
        import redis

        for number in REDIS_DBS:
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
            try:
                if client.dbsize() == 0 and client.set("abi_cluster_claim", self.token, nx=True):
                    self.redis_db = number
                    return
            finally:
                client.close()
        raise ClusterError(f"No free Redis database among {list(REDIS_DBS)} (each holds keys).")

    def _release_redis_db(self) -> None:
        if self.redis_db is None:
            return
        import redis

        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=self.redis_db)
        try:
            if client.get("abi_cluster_claim") in (self.token.encode(), None):
                client.flushdb()
        finally:
            client.close()
        self.redis_db = None

    # ------------------------------------------------------------------ REST API

    @property
    def http(self) -> httpx.Client:
        """An HTTP client on the api-server with a JWT from ``POST /auth/token`` (SimpleAuthManager)."""
        if self._http is None:
            client = httpx.Client(base_url=self.api_url, timeout=30)
            reply = client.post("/auth/token", json={"username": "admin", "password": "unused"})
            reply.raise_for_status()
            client.headers["Authorization"] = f"Bearer {reply.json()['access_token']}"
            self._http = client
        return self._http

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call ``/api/v2{path}``; the decoded JSON reply. Fails with the reply's text on an HTTP error."""
        reply = self.http.request(method, f"/api/v2{path}", **kwargs)
        if reply.is_error:
            raise ClusterError(f"{method} {path}: HTTP {reply.status_code}: {reply.text[:2000]}")
        return reply.json() if reply.content else None

    def _api_healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_for_dag(self, dag_id: str, timeout: float = 90) -> None:
        """Wait until the dag-processor has serialized ``dag_id``, then unpause it."""
        deadline = time.monotonic() + timeout

        def parsed() -> bool:
            reply = self.http.get(f"/api/v2/dags/{dag_id}")
            return reply.status_code == 200

        self.wait_for(parsed, deadline, f"DAG {dag_id} to be parsed")
        self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str) -> str:
        """Trigger a manual run of ``dag_id`` with ``conf``; its run id."""
        reply = self.api(
            "POST", f"/dags/{dag_id}/dagRuns", json={"dag_run_id": run_id, "logical_date": None, "conf": conf}
        )
        return reply["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of the run (mapped ones one per map index)."""
        reply = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000})
        return reply["task_instances"]

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict[str, Any]]:
        """Every try of one task instance (earlier tries from the history, then the current one)."""
        reply = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/tries")
        return reply["task_instances"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 240) -> str:
        """Wait until the run is success or failed; its state."""
        deadline = time.monotonic() + timeout
        states: list[str] = []

        def done() -> bool:
            states.append(self.run_state(dag_id, run_id))
            return states[-1] in TERMINAL_RUN_STATES

        self.wait_for(done, deadline, f"run {run_id} of {dag_id} to finish", self._ti_summary(dag_id, run_id))
        return states[-1]

    def _ti_summary(self, dag_id: str, run_id: str) -> Callable[[], str]:
        def summary() -> str:
            try:
                tis = self.task_instances(dag_id, run_id)
            except Exception as error:
                return f"(task instances unavailable: {error})"
            return "\n".join(
                f"  {t['task_id']}[{t['map_index']}] {t['state']} try {t['try_number']} on {t['hostname']}"
                for t in tis
            )

        return summary

    # ------------------------------------------------------------------ waiting and diagnostics

    def wait_for(
        self,
        condition: Callable[[], Any],
        deadline: float,
        what: str,
        details: Callable[[], str] | None = None,
        interval: float = 0.5,
    ) -> Any:
        """Poll ``condition`` until it is truthy; on the deadline fail with every component's log tail."""
        while True:
            with contextlib.suppress(OSError, httpx.HTTPError):
                result = condition()
                if result:
                    return result
            dead = [c.name for c in self.components if c.proc is not None and c.proc.poll() is not None]
            if time.monotonic() > deadline or dead:
                reason = f"components exited: {dead}" if dead else "timed out"
                extra = details() if details else ""
                raise ClusterError(f"Waiting for {what}: {reason}.\n{extra}\n{self.diagnostics()}")
            time.sleep(interval)

    def diagnostics(self, lines: int = 30) -> str:
        """The last lines of each component's log."""
        parts = []
        for comp in self.components:
            code = comp.proc.poll() if comp.proc else None
            status = "running" if code is None else f"exited {code}"
            parts.append(f"----- {comp.name} ({status}): {comp.log}\n{tail(comp.log, lines)}")
        return "\n".join(parts)

    def worker_of(self, ti_ids: Iterable[str]) -> dict[str, list[str]]:
        """Which worker's log says it executed each task instance id (``Executing workload in Celery``)."""
        logs = {name: (self.logs / f"{name}.log").read_text(errors="replace") for name in self.workers}
        found: dict[str, list[str]] = {}
        for ti_id in ti_ids:
            found[ti_id] = [
                name
                for name, text in logs.items()
                if any("Executing workload" in line and ti_id in line for line in text.splitlines())
            ]
        return found

    def task_log(self, dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int) -> Path:
        """The local log file of one try (all components share this machine's AIRFLOW_HOME)."""
        folder = self.airflow_home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        if map_index >= 0:
            folder = folder / f"map_index={map_index}"
        return folder / f"attempt={try_number}.log"


def _fernet_key(seed: str) -> str:
    import base64
    import hashlib

    return base64.urlsafe_b64encode(hashlib.sha256(seed.encode()).digest()).decode()


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
