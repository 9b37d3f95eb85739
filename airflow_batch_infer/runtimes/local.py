"""The embedded default runtime: a real ``tritonserver`` process on this machine.

The binary comes from the PyPI wheel ``nvidia-pytriton`` (Triton 2.51 with only the Python backend), installed
in a server environment of its own (numpy<2), apart from the project's environment. An ``onnxruntime`` model
is served by a generic Python-backend model that runs the same ``model.onnx`` with onnxruntime.

``python -m airflow_batch_infer.runtimes.local prepare`` builds that server environment ahead of time.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_batch_infer.paths import batch_infer_home, triton_server_env
from airflow_batch_infer.processes import pid_alive
from airflow_batch_infer.runtimes.base import ServerInfo, ServerStartError, TritonRuntime
from airflow_batch_infer.runtimes.labels import ServerOwner

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
SERVER_REQUIREMENTS = _HERE / "server-requirements.txt"
ONNX_MODEL_PY = _HERE / "python_models" / "onnx_model.py"
SUPERVISOR = _HERE / "supervisor.py"
READY_FILE = "ready"  # written in the server's folder once it was seen ready: the supervisor may restart it

#: Bump when the layout of a prepared server environment changes, so existing ones are rebuilt.
_LAYOUT_VERSION = "1"
_READY_MARKER = ".batch-infer-server-env"
_RUNTIME_DIR = "triton-runtime"
_PORT_ATTEMPTS = 3
_PORT_CLASH_HINTS = ("address already in use", "address in use", "failed to listen", "failed to bind")
# The server stays in "loading" forever after these (the stub process is gone): fail at once.
_HANG_HINTS = ("Failed to preinitialize Python stub",)
_NOISE = ("CudaDriverHelper has not been initialized",)
_ONNX_BACKENDS = {"onnxruntime"}
_ONNX_PLATFORMS = {"onnxruntime_onnx"}
#: Written in each server's folder at launch: its handle and owner, read by :meth:`list_servers`.
_SERVER_RECORD = "server.json"

# Run by the server environment's interpreter: what the server needs to know about it.
_PROBE = """
import json, sys, sysconfig
try:
    import numpy
    numpy_version = numpy.__version__
except Exception:
    numpy_version = None
print(json.dumps({
    "version": "%d.%d" % sys.version_info[:2],
    "purelib": sysconfig.get_paths()["purelib"],
    "platlib": sysconfig.get_paths()["platlib"],
    "libdir": sysconfig.get_config_var("LIBDIR"),
    "numpy": numpy_version,
}))
"""


@dataclass(frozen=True)
class ServerEnv:
    """A prepared server environment.

    :param path: root of the virtual environment.
    :param python: its interpreter.
    :param site_packages: its ``site-packages`` folder (holds ``pytriton`` and ``nvidia_pytriton.libs``).
    :param libdir: the interpreter's ``LIBDIR`` (holds ``libpython``), needed by the Python backend stub.
    :param runtime_dir: the runnable copy of Triton: ``bin/``, ``backends/`` (with the stub), ``caches/``.
    :param numpy_version: numpy installed in it (always < 2).
    """

    path: Path
    python: Path
    site_packages: Path
    libdir: str
    runtime_dir: Path
    numpy_version: str

    @property
    def tritonserver(self) -> Path:
        return self.runtime_dir / "bin" / "tritonserver"

    def process_env(self) -> dict[str, str]:
        """Environment variables for the server process: its libraries and its Python first."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        libs = [str(self.site_packages / "nvidia_pytriton.libs"), self.libdir]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env["PATH"] = os.pathsep.join([str(self.path / "bin"), env.get("PATH", os.defpath)])
        env["VIRTUAL_ENV"] = str(self.path)
        return env


def probe_python(python: str | Path) -> dict[str, Any]:
    """Ask an interpreter for its version, site-packages, ``LIBDIR`` and numpy version.

    :param python: path of the interpreter.
    """
    try:
        out = subprocess.run(
            [str(python), "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServerStartError(f"Cannot run the server environment's Python {python}: {exc}") from exc
    return json.loads(out.strip().splitlines()[-1])


def check_server_numpy(python: str | Path) -> str:
    """Refuse an interpreter whose numpy is missing or >= 2; return its numpy version.

    With numpy 2 in the Python backend stub's interpreter, inputs silently arrive as zeros and outputs come
    back empty (Triton 2.51's stub is built against numpy 1).

    :param python: path of the server environment's interpreter.
    """
    version = probe_python(python)["numpy"]
    fix = (
        "Rebuild the server environment from airflow_batch_infer/runtimes/server-requirements.txt "
        "(numpy<2): `python -m airflow_batch_infer.runtimes.local prepare`, or point `server_env` at one."
    )
    if version is None:
        raise ServerStartError(f"The server environment's Python {python} has no numpy. {fix}")
    if int(version.split(".")[0]) >= 2:
        raise ServerStartError(
            f"The server environment's Python {python} has numpy {version}: Triton 2.51's Python backend "
            f"needs numpy<2 (with numpy 2, inputs silently arrive as zeros). {fix}"
        )
    return version


def _requirements_hash() -> str:
    digest = hashlib.sha256()
    digest.update(SERVER_REQUIREMENTS.read_bytes())
    digest.update(f"layout={_LAYOUT_VERSION};python={sys.version_info[0]}.{sys.version_info[1]}".encode())
    return digest.hexdigest()


def _base_python() -> str:
    """The interpreter the project's virtualenv was made from (same major.minor as this one)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [
        getattr(sys, "_base_executable", None),
        str(Path(sys.base_prefix) / "bin" / f"python{version}"),
        str(Path(sys.base_prefix) / "bin" / "python3"),
        sys.executable,
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    return sys.executable


def _find_uv() -> str | None:
    with contextlib.suppress(Exception):
        import uv  # type: ignore[import-not-found]

        return uv.find_uv_bin()
    sibling = Path(sys.executable).parent / "uv"
    if sibling.exists():
        return str(sibling)
    return shutil.which("uv")


def _run_build_step(cmd: list[str]) -> None:
    log.info("Server environment: %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ServerStartError(
            f"Building the Triton server environment failed ({' '.join(cmd)} exited {result.returncode}):\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a model file (models can be large), copying when the link is not possible.

    Configs and Python files are always copied: the copy may be rewritten, the source must never be.
    """
    if Path(src).name == "config.pbtxt" or src.endswith(".py"):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_new_file(path: Path, text: str) -> None:
    """Write ``text`` to a new inode at ``path`` (never through a hard link to a source file)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class LocalTritonRuntime(TritonRuntime):
    """Runs ``tritonserver`` as a local process that outlives the task that started it.

    :param server_env: the server's virtual environment (built on first use);
        default ``$BATCH_INFER_TRITON_ENV``, else ``$BATCH_INFER_HOME/triton-server-env``.
    :param work_root: where each server gets its folder (model repository copy, ``server.log``);
        default ``$BATCH_INFER_HOME/servers``.
    :param startup_timeout: seconds to wait for the server and its models to be ready.
    :param stop_grace_period: seconds between SIGTERM and SIGKILL when stopping.
    :param log_verbose: Triton's ``--log-verbose`` level.
    :param onnx_intra_op_threads: onnxruntime intra-op threads per instance of a converted ONNX model.
    :param max_restarts: how often a server that dies after it was ready is started again, on the same
        ports, by a small supervisor process (as a container runtime's restart policy would); 0 leaves a
        dead server dead.
    :param grpc_tls: serve gRPC over TLS: ``server_cert`` and ``server_key`` (PEM files), and
        ``root_cert`` (the CA that signs client certificates) to require them (mutual TLS). Clients
        then need a ``triton`` connection with ``ssl`` and the CA (and their own certificate).
    """

    name = "local"

    def __init__(
        self,
        server_env: str | os.PathLike[str] | None = None,
        work_root: str | os.PathLike[str] | None = None,
        startup_timeout: float = 120,
        stop_grace_period: float = 15,
        log_verbose: int = 0,
        onnx_intra_op_threads: int = 1,
        max_restarts: int = 5,
        grpc_tls: dict[str, str] | None = None,
    ) -> None:
        self.server_env = Path(server_env).expanduser() if server_env else triton_server_env()
        self.work_root = Path(work_root).expanduser() if work_root else batch_infer_home() / "servers"
        self.startup_timeout = float(startup_timeout)
        self.stop_grace_period = float(stop_grace_period)
        self.log_verbose = int(log_verbose)
        self.onnx_intra_op_threads = int(onnx_intra_op_threads)
        self.max_restarts = int(max_restarts)
        self.grpc_tls = dict(grpc_tls or {})
        unknown = set(self.grpc_tls) - {"server_cert", "server_key", "root_cert"}
        if unknown or (self.grpc_tls and not {"server_cert", "server_key"} <= set(self.grpc_tls)):
            raise ValueError(
                "grpc_tls takes server_cert and server_key (PEM files), and root_cert for mutual TLS; "
                f"got {sorted(self.grpc_tls)}."
            )
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ server environment

    def ensure_server_env(self) -> ServerEnv:
        """Build the server environment if it is missing or out of date, and return it.

        Safe when several processes call it at once (a file lock next to the environment).
        """
        env_path = self.server_env.resolve()
        marker = env_path / _READY_MARKER
        wanted = _requirements_hash()
        if not (marker.exists() and marker.read_text().strip() == wanted):
            env_path.parent.mkdir(parents=True, exist_ok=True)
            lock_path = env_path.with_name(env_path.name + ".lock")
            with open(lock_path, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    if not (marker.exists() and marker.read_text().strip() == wanted):
                        self._build_server_env(env_path)
                        marker.write_text(wanted + "\n")
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        return self._load_server_env(env_path)

    def _build_server_env(self, env_path: Path) -> None:
        started = time.monotonic()
        log.info("Building the Triton server environment in %s (once; takes a minute).", env_path)
        if env_path.exists():
            if not (env_path / "pyvenv.cfg").exists() and any(env_path.iterdir()):
                raise ServerStartError(
                    f"{env_path} exists and is not a virtual environment; choose another `server_env`."
                )
            shutil.rmtree(env_path)
        base = _base_python()
        python = env_path / "bin" / "python"
        uv = _find_uv()
        if uv:
            _run_build_step([uv, "venv", "-q", "--python", base, str(env_path)])
            install = [uv, "pip", "install", "-q", "--python", str(python)]
        else:
            _run_build_step([base, "-m", "venv", str(env_path)])
            install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        _run_build_step([*install, "--no-deps", "-r", str(SERVER_REQUIREMENTS)])

        info = probe_python(python)
        check_server_numpy(python)
        triton = Path(info["platlib"]) / "pytriton" / "tritonserver"
        if not (triton / "bin" / "tritonserver").exists():
            raise ServerStartError(f"nvidia-pytriton installed no tritonserver binary under {triton}.")
        stub = triton / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
        if not stub.exists():
            available = sorted(p.name for p in (triton / "python_backend_stubs").iterdir())
            raise ServerStartError(
                f"No Triton Python backend stub for Python {info['version']} (available: {available}); "
                "use one of those Python versions for the project."
            )
        runtime = env_path / _RUNTIME_DIR
        runtime.mkdir()
        for part in ("bin", "backends", "caches"):
            if (triton / part).exists():
                shutil.copytree(triton / part, runtime / part, symlinks=True)
        (runtime / "backends" / "python").mkdir(parents=True, exist_ok=True)
        shutil.copy2(stub, runtime / "backends" / "python" / "triton_python_backend_stub")
        log.info("Triton server environment ready in %.1f s: %s", time.monotonic() - started, env_path)

    def _load_server_env(self, env_path: Path) -> ServerEnv:
        python = env_path / "bin" / "python"
        info = probe_python(python)
        numpy_version = check_server_numpy(python)
        env = ServerEnv(
            path=env_path,
            python=python,
            site_packages=Path(info["platlib"]),
            libdir=info["libdir"] or "",
            runtime_dir=env_path / _RUNTIME_DIR,
            numpy_version=numpy_version,
        )
        if not env.tritonserver.exists():
            raise ServerStartError(
                f"{env.tritonserver} is missing: remove {env_path / _READY_MARKER} and run "
                "`python -m airflow_batch_infer.runtimes.local prepare`."
            )
        return env

    # ------------------------------------------------------------------ model repository

    def materialize_repository(
        self, model_repository: str | os.PathLike[str], models: list[str] | None, target: Path
    ) -> list[str]:
        """Copy the requested models into ``target``; ``onnxruntime`` models become Python-backend models.

        :param model_repository: the source repository (``<model>/config.pbtxt``, ``<model>/<version>/``).
        :param models: model names to copy; all models in the repository when ``None``.
        :param target: the new repository folder (created).
        :returns: the names of the models copied.
        """
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        source = Path(model_repository)
        if not source.is_dir():
            raise ServerStartError(f"Model repository {source} does not exist.")
        available = sorted(p.name for p in source.iterdir() if (p / "config.pbtxt").is_file())
        names = list(available) if models is None else list(dict.fromkeys(models))
        missing = [m for m in names if m not in available]
        if missing:
            raise ServerStartError(f"Models {missing} are not in {source} (it has {available}).")
        if not names:
            raise ServerStartError(f"No models (folders with a config.pbtxt) in {source}.")

        plans: list[tuple[str, Any, bool]] = []
        for name in names:
            config_path = source / name / "config.pbtxt"
            try:
                config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
            except text_format.ParseError as exc:
                raise ServerStartError(f"Cannot parse {config_path}: {exc}") from exc
            if not config.name:
                config.name = name
            plans.append((name, config, self._needs_onnx_conversion(source / name, config)))

        target.mkdir(parents=True)
        for name, config, convert in plans:
            src, dst = source / name, target / name
            shutil.copytree(src, dst, copy_function=_link_or_copy)
            if convert:
                self._convert_onnx_model(dst, config)
                log.info(
                    "Model %r (backend onnxruntime) is served by the Python backend through onnxruntime: "
                    "this tritonserver build (nvidia-pytriton) has no native onnxruntime backend.",
                    name,
                )
        return names

    @staticmethod
    def _needs_onnx_conversion(model_dir: Path, config: Any) -> bool:
        backend, platform = config.backend, config.platform
        if backend in _ONNX_BACKENDS or platform in _ONNX_PLATFORMS:
            return True
        if backend == "python" or platform == "ensemble":
            return False
        if not backend and not platform and any(model_dir.glob("[0-9]*/model.onnx")):
            return True
        raise ServerStartError(
            f"The local runtime cannot serve model {config.name!r} (backend {backend!r}, platform "
            f"{platform!r}): its tritonserver build has only the Python backend, so it serves 'python' "
            "and 'onnxruntime' models. Use a GPU runtime (docker, kubernetes, ecs) with NVIDIA's Triton "
            "image for this model."
        )

    def _convert_onnx_model(self, model_dir: Path, config: Any) -> None:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        onnx_name = config.default_model_filename or "model.onnx"
        if not config.input or not config.output:
            raise ServerStartError(
                f"Model {config.name!r}: the local runtime serves ONNX models through the Python backend, "
                "which cannot complete a config from the model file; declare every input and output in "
                f"{model_dir.name}/config.pbtxt."
            )
        config.backend = "python"
        config.platform = ""
        config.default_model_filename = ""
        config.ClearField("optimization")
        for group in config.instance_group:
            group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
            group.ClearField("gpus")
        config.parameters["onnx_model_filename"].string_value = onnx_name
        config.parameters["onnx_intra_op_threads"].string_value = str(self.onnx_intra_op_threads)

        versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if not versions:
            raise ServerStartError(f"Model {config.name!r} has no version folder (e.g. 1/{onnx_name}).")
        for version in versions:
            if not (version / onnx_name).is_file():
                raise ServerStartError(
                    f"Model {config.name!r}: {model_dir.name}/{version.name}/{onnx_name} is missing from the "
                    "model repository; build or copy the model file there."
                )
            _write_new_file(version / "model.py", ONNX_MODEL_PY.read_text())
        _write_new_file(
            model_dir / "config.pbtxt",
            "# Written by airflow_batch_infer's local runtime: an onnxruntime model served by the Python "
            "backend.\n" + text_format.MessageToString(config),
        )

    # ------------------------------------------------------------------ start

    def _prepare(
        self, model_repository: str, models: list[str] | None
    ) -> tuple[ServerEnv, str, Path, Path, list[str]]:
        """The server environment, a new server id and folder, and the materialised repository in it."""
        env = self.ensure_server_env()
        _remove_orphaned_server_shm()
        server_id = f"abi-{uuid.uuid4().hex[:12]}"
        workdir = (self.work_root / server_id).resolve()
        repo = workdir / "models"
        workdir.mkdir(parents=True)
        try:
            names = self.materialize_repository(model_repository, models, repo)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return env, server_id, workdir, repo, names

    def launch(
        self, model_repository: str, models: list[str] | None = None, owner: ServerOwner | None = None
    ) -> ServerInfo:
        """Start ``tritonserver`` for ``models`` and return at once, before it is ready.

        Waiting is left to :meth:`wait_ready` or ``TritonServerReadyTrigger``; unlike :meth:`start`, a port
        taken between choosing it and binding it is reported as a failure, not retried.

        :param model_repository: path of the model repository.
        :param models: names of the models to serve; every model in the repository when ``None``.
        :param owner: the task instance that starts it, recorded in the server's folder.
        """
        env, server_id, workdir, repo, names = self._prepare(model_repository, models)
        info = self._server_info(server_id, workdir, _free_ports(3), owner)
        try:
            proc = self._launch(env, info, repo)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self._children[proc.pid] = proc
        log.info(
            "Triton %s launched (pid %d, models %s): gRPC %s; log %s",
            server_id,
            proc.pid,
            names,
            info.grpc_url,
            info.handle["log_path"],
        )
        return info

    def start(
        self, model_repository: str, models: list[str] | None = None, owner: ServerOwner | None = None
    ) -> ServerInfo:
        """Start ``tritonserver`` for ``models`` and wait until the server and every model are ready.

        :param model_repository: path of the model repository.
        :param models: names of the models to serve; every model in the repository when ``None``.
        :param owner: the task instance that starts it, recorded in the server's folder.
        """
        started = time.monotonic()
        env, server_id, workdir, repo, names = self._prepare(model_repository, models)

        for attempt in range(1, _PORT_ATTEMPTS + 1):
            ports = _free_ports(3)
            info = self._server_info(server_id, workdir, ports, owner)
            proc = self._launch(env, info, repo)
            try:
                self._wait_ready(proc, info, names, started)
            except _PortClashError:
                self._kill_failed(proc, info)
                if attempt < _PORT_ATTEMPTS:
                    log.warning("Triton %s: a port was taken (attempt %d); retrying.", server_id, attempt)
                    continue
                shutil.rmtree(repo, ignore_errors=True)
                self._fail(info, f"its ports stayed taken after {_PORT_ATTEMPTS} attempts")
            except BaseException:
                self._kill_failed(proc, info)
                shutil.rmtree(repo, ignore_errors=True)
                raise
            self._children[proc.pid] = proc
            self.mark_ready(info)
            log.info(
                "Triton %s ready in %.1f s (pid %d, models %s): gRPC %s, HTTP %s, metrics %s; log %s",
                server_id,
                time.monotonic() - started,
                proc.pid,
                names,
                info.grpc_url,
                info.http_url,
                info.metrics_url,
                info.handle["log_path"],
            )
            return info
        raise AssertionError("unreachable")  # pragma: no cover

    def mark_ready(self, info: ServerInfo) -> None:
        """Record that the server was seen ready: from now on its supervisor restarts it if it dies."""
        (Path(info.handle["workdir"]) / READY_FILE).touch()

    def _server_info(
        self, server_id: str, workdir: Path, ports: list[int], owner: ServerOwner | None = None
    ) -> ServerInfo:
        http, grpc, metrics = ports
        return ServerInfo(
            runtime=self.name,
            grpc_url=f"127.0.0.1:{grpc}",
            http_url=f"http://127.0.0.1:{http}",
            metrics_url=f"http://127.0.0.1:{metrics}/metrics",
            handle={
                "pid": None,
                "server_id": server_id,
                "workdir": str(workdir),
                "log_path": str(workdir / "server.log"),
                "shm_prefix": f"{server_id}-shm-",
                "hostname": socket.gethostname(),
                "http_port": http,
                "grpc_port": grpc,
                "metrics_port": metrics,
                "owner": owner.to_dict() if owner else None,
                "started_at": time.time(),
            },
        )

    def _launch(self, env: ServerEnv, info: ServerInfo, repo: Path) -> subprocess.Popen[bytes]:
        h = info.handle
        cmd = [
            str(env.tritonserver),
            f"--model-repository={repo}",
            f"--backend-directory={env.runtime_dir / 'backends'}",
            f"--cache-directory={env.runtime_dir / 'caches'}",
            f"--id={h['server_id']}",
            "--http-address=127.0.0.1",
            f"--http-port={h['http_port']}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={h['grpc_port']}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={h['metrics_port']}",
            "--exit-timeout-secs=5",
            "--pinned-memory-pool-byte-size=0",
            "--allow-gpu-metrics=false",
            f"--backend-config=python,shm-region-prefix-name={h['shm_prefix']}",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.grpc_tls:
            cmd += [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={self.grpc_tls['server_cert']}",
                f"--grpc-server-key={self.grpc_tls['server_key']}",
            ]
            if self.grpc_tls.get("root_cert"):
                cmd += [f"--grpc-root-cert={self.grpc_tls['root_cert']}", "--grpc-use-ssl-mutual=true"]
        if self.max_restarts > 0:
            cmd = [
                sys.executable,
                str(SUPERVISOR),
                f"--ready-url={info.http_url}/v2/health/ready",
                f"--ready-file={Path(h['workdir']) / READY_FILE}",
                f"--shm-prefix={h['shm_prefix']}",
                f"--max-restarts={self.max_restarts}",
                "--",
                *cmd,
            ]
        log_path = Path(h["log_path"])
        if log_path.exists():  # keep an earlier attempt's log (port clash) for the record
            log_path.replace(log_path.with_name(f"server.{time.time_ns()}.log"))
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env.process_env(),
                cwd=h["workdir"],
                start_new_session=True,
            )
        h["pid"] = proc.pid
        _write_new_file(Path(h["workdir"]) / _SERVER_RECORD, json.dumps(info.to_dict(), indent=1))
        return proc

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], info: ServerInfo, models: list[str], started: float
    ) -> None:
        server_id = info.handle["server_id"]
        deadline = started + self.startup_timeout
        foreign = False
        while True:
            code = proc.poll()
            if code is not None:
                tail = self.log_tail(info, 200).lower()
                if foreign or any(hint in tail for hint in _PORT_CLASH_HINTS):
                    raise _PortClashError
                self._fail(info, f"tritonserver exited with code {code} before it was ready")
            if time.monotonic() > deadline:
                self._fail(info, f"it was not ready within {self.startup_timeout:g} s (startup_timeout)")
            hang = next((h for h in _HANG_HINTS if h in self.log_tail(info, 100)), None)
            if hang:
                self._fail(info, f"a Python backend stub failed ({hang!r}), so the model would never load")
            if _http_get(f"{info.http_url}/v2/health/ready")[0] == 200:
                status, body = _http_get(f"{info.http_url}/v2")
                if status == 200:
                    try:
                        name = json.loads(body).get("name")
                    except ValueError:
                        name = None
                    if name != server_id:
                        foreign = True  # another server answers on our port; ours will fail to bind.
                    elif all(_http_get(f"{info.http_url}/v2/models/{m}/ready")[0] == 200 for m in models):
                        return
            time.sleep(0.1)

    def _fail(self, info: ServerInfo, why: str) -> None:
        tail = self.log_tail(info, 40)
        errors = _server_errors(self.log_tail(info, 2000))
        found = "Errors reported by the server:\n" + "\n".join(errors) + "\n" if errors else ""
        raise ServerStartError(
            f"Triton server {info.handle['server_id']} did not start: {why}.\n{found}"
            f"Last lines of {info.handle['log_path']}:\n{tail}\n"
            "Fix the model named in the errors above (config.pbtxt, model files, model.py), or raise "
            "startup_timeout if models are slow to load; run with log_verbose=1 for more detail."
        )

    def _kill_failed(self, proc: subprocess.Popen[bytes], info: ServerInfo) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        _wait_group_gone(proc.pid, 5)
        _remove_shm(info.handle["shm_prefix"])

    # ------------------------------------------------------------------ stop and inspect

    def _check_host(self, info: ServerInfo) -> None:
        host = info.handle.get("hostname")
        if host and host != socket.gethostname():
            raise RuntimeError(
                f"Triton server {info.handle.get('server_id')} runs on host {host!r}, not on "
                f"{socket.gethostname()!r}: the local runtime can only reach servers on its own host. Run "
                "the teardown task on that host (e.g. a worker queue pinned to it) or use a remote runtime."
            )

    def _is_ours(self, info: ServerInfo) -> bool:
        pid, server_id = info.handle.get("pid"), info.handle.get("server_id")
        if not pid or not server_id:
            return False
        self._reap(pid)
        return pid_alive(pid) and server_id in _cmdline(pid)

    def _reap(self, pid: int) -> None:
        proc = self._children.get(pid)
        if proc is not None:
            if proc.poll() is not None:
                self._children.pop(pid, None)
            return
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)

    def stop(self, info: ServerInfo) -> bool:
        """Stop the server: SIGTERM to its process group, SIGKILL after ``stop_grace_period``.

        :param info: what :meth:`start` returned (or its ``to_dict()`` round trip).
        :returns: ``False`` when it was already gone.
        """
        self._check_host(info)
        h = info.handle
        pid, server_id = h.get("pid"), h.get("server_id")
        try:
            if not self._is_ours(info):
                log.info("Triton %s (pid %s) was already gone.", server_id, pid)
                return False
            started = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # the supervisor passes it on, and does not restart
            if not self._wait_exit(pid, self.stop_grace_period):
                log.warning(
                    "Triton %s did not exit %g s after SIGTERM; sending SIGKILL.",
                    server_id,
                    self.stop_grace_period,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                self._wait_exit(pid, 10)
            if not _wait_group_gone(pid, 5):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                _wait_group_gone(pid, 5)
            log.info("Triton %s (pid %d) stopped in %.1f s.", server_id, pid, time.monotonic() - started)
            return True
        finally:
            if h.get("shm_prefix"):
                _remove_shm(h["shm_prefix"])
            if h.get("workdir"):
                shutil.rmtree(Path(h["workdir"]) / "models", ignore_errors=True)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._reap(pid)
            if not pid_alive(pid):
                self._children.pop(pid, None)
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def is_running(self, info: ServerInfo) -> bool:
        """Whether the server's process is still there (same pid and same server id).

        :param info: what :meth:`start` returned.
        """
        self._check_host(info)
        return self._is_ours(info)

    def log_tail(self, info: ServerInfo, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's ``server.log``.

        :param info: what :meth:`start` returned.
        :param lines: how many lines.
        """
        path = info.handle.get("log_path")
        if not path:
            return ""
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max(lines, 1) * 1000))
                data = f.read()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])

    def failure_reason(self, info: ServerInfo) -> str | None:
        """Why the server will never be ready: its process exited, or a Python backend stub failed.

        :param info: what :meth:`launch` returned.
        """
        self._check_host(info)
        tail = self.log_tail(info, 200)
        if not self._is_ours(info):
            if any(hint in tail.lower() for hint in _PORT_CLASH_HINTS):
                return "tritonserver exited: one of its ports was taken by another process"
            errors = _server_errors(self.log_tail(info, 2000))
            found = (": " + " | ".join(errors)) if errors else ""
            return f"tritonserver exited before it was ready{found}"
        hang = next((h for h in _HANG_HINTS if h in tail), None)
        if hang:
            return f"a Python backend stub failed ({hang!r}), so the model would never load"
        return None

    def list_servers(self) -> list[ServerInfo]:
        """Servers under ``work_root`` on this host whose process runs or whose folder was not cleaned up.

        Each server's ``server.json`` (written at launch) holds its handle and owner.
        """
        servers = []
        if not self.work_root.is_dir():
            return servers
        for record in sorted(self.work_root.glob(f"abi-*/{_SERVER_RECORD}")):
            try:
                info = ServerInfo.from_dict(json.loads(record.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if info.handle.get("hostname") not in (None, socket.gethostname()):
                continue
            running = self._is_ours(info)
            if running or (record.parent / "models").exists():
                info.handle["state"] = "running" if running else "exited"
                servers.append(info)
        return servers


class _PortClashError(Exception):
    """The server could not bind one of its ports (picked free, then taken by someone else)."""


def _server_errors(text: str, limit: int = 10) -> list[str]:
    """The server's own error lines (glog ``E`` lines and ``error:``), without the harmless CUDA one."""
    errors = []
    for line in text.splitlines():
        is_error = (line[:1] == "E" and line[1:5].isdigit()) or line.startswith("error:")
        if is_error and not any(noise in line for noise in _NOISE):
            errors.append(line if len(line) <= 600 else line[:600] + " ...")
    return errors[-limit:]


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http to 127.0.0.1)
            return response.status, response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (OSError, ValueError):
        return 0, ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg; look for a live member.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _remove_shm(prefix: str) -> list[str]:
    removed = []
    shm = Path("/dev/shm")  # noqa: S108 (POSIX shared memory, named by our own prefix)
    if prefix and shm.is_dir():
        for region in shm.glob(f"{prefix}*"):
            try:
                region.unlink()
                removed.append(region.name)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("Could not remove shared memory region %s: %s", region, exc)
    if removed:
        log.info("Removed leftover shared memory regions: %s", removed)
    return removed


def _remove_orphaned_server_shm() -> None:
    """Remove the Python backend's regions of servers that are gone without a stop (SIGKILLed, say).

    Regions are named ``<server id>-shm-...``; a server is alive while a process has ``--id=<server id>``.
    """
    shm = Path("/dev/shm")  # noqa: S108 (POSIX shared memory, named by our own prefix)
    regions = list(shm.glob("abi-*-shm-*")) if shm.is_dir() else []
    if not regions:
        return
    alive = set()
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            for arg in (proc / "cmdline").read_bytes().split(b"\0"):
                if arg.startswith(b"--id=abi-"):
                    alive.add(arg[5:].decode())
    for server_id in {r.name.split("-shm-", 1)[0] for r in regions} - alive:
        _remove_shm(f"{server_id}-shm-")


def main(argv: list[str] | None = None) -> int:
    """``python -m airflow_batch_infer.runtimes.local prepare``: build the server environment."""
    parser = argparse.ArgumentParser(prog="python -m airflow_batch_infer.runtimes.local")
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="build the Triton server environment (idempotent)")
    prepare.add_argument(
        "--server-env",
        help="where (default: $BATCH_INFER_TRITON_ENV, else $BATCH_INFER_HOME/triton-server-env)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "prepare":
        env = LocalTritonRuntime(server_env=args.server_env).ensure_server_env()
        print(f"Triton server environment: {env.path}")
        print(f"  tritonserver: {env.tritonserver}")
        print(f"  python: {env.python} (numpy {env.numpy_version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
