"""The local runtime's server environment: a virtual environment of its own with ``nvidia-pytriton``
(Triton 2.51 and its Python backend), numpy<2 and onnxruntime, apart from the project's environment.

Built once per machine (``python -m airflow_batch_infer.runtimes.local prepare``); what a start needs to know
about it (Python version, site-packages, ``LIBDIR``, numpy version) is probed once at build and kept next to
it, so a start on a warm worker runs no interpreter to check it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from airflow_batch_infer.runtimes.base import ServerStartError

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
SERVER_REQUIREMENTS = _HERE / "server-requirements.txt"

#: Bump when the layout of a prepared server environment changes, so existing ones are rebuilt.
_LAYOUT_VERSION = "1"
_READY_MARKER = ".batch-infer-server-env"
_RUNTIME_DIR = "triton-runtime"
#: The worker's environment variables that the server process gets (everything else stays behind).
_ENV_ALLOWED = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "CUDA_VISIBLE_DEVICES"}
)
_ENV_PREFIXES = ("LC_", "OMP_", "MKL_", "OPENBLAS_")

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

    def process_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment variables for the server process: an allowlist of the worker's, never its secrets.

        The worker's environment may hold credentials (``AWS_*``, ``AIRFLOW_CONN_*``); the server and its
        model stubs, which run the models' code, get only what they need: locale, temporary folder, thread
        settings, its libraries and its Python first on ``PATH``.

        :param extra: more variables, set as they are (the runtime's ``environment`` option).
        """
        env = {k: v for k, v in os.environ.items() if k in _ENV_ALLOWED or k.startswith(_ENV_PREFIXES)}
        env.update(extra or {})
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


class ServerEnvMissingError(ServerStartError, AirflowFailException):
    """The server environment is not built (or out of date) where a task needs it: a retry cannot fix it,
    so the task fails at once."""


def prepare_command(env_path: Path) -> str:
    """The command that builds the server environment at ``env_path``, for error messages and docs."""
    return f"python -m airflow_batch_infer.runtimes.local prepare --server-env {env_path}"


def ensure_server_env(env_path: Path, build: bool = True) -> ServerEnv:
    """Return the server environment at ``env_path``, built first if it is missing or out of date.

    Safe when several processes call it at once (a file lock next to the environment). A warm call reads
    the facts probed at build time from the ready marker: no interpreter is started.

    :param env_path: root of the server's virtual environment.
    :param build: build it when needed (``prepare``, at deploy or image build time); ``False`` (a task on a
        worker, which may have no package index) fails instead with the command that builds it.
    """
    env_path = env_path.resolve()
    marker = env_path / _READY_MARKER
    wanted = _requirements_hash()
    facts = _read_marker(marker, wanted)
    if facts is None and not build:
        state = "is out of date (its requirements changed)" if marker.exists() else "is missing"
        raise ServerEnvMissingError(
            f"The local Triton runtime's server environment {env_path} {state}; a task never installs "
            f"packages. Build it on this worker (or in its image) with `{prepare_command(env_path)}` "
            "(`make setup` does), or point [batch_infer] triton_server_env ($BATCH_INFER_TRITON_ENV) at a "
            "prebuilt one."
        )
    if facts is None:
        env_path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = env_path.with_name(env_path.name + ".lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                facts = _read_marker(marker, wanted)
                if facts is None:
                    if not (marker.exists() and marker.read_text().split("\n", 1)[0].strip() == wanted):
                        _build_server_env(env_path)
                    facts = _probe_env(env_path)
                    marker.write_text(wanted + "\n" + json.dumps(facts) + "\n")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return _load_server_env(env_path, facts)


def _read_marker(marker: Path, wanted: str) -> dict[str, Any] | None:
    """The probed facts in an up-to-date ready marker (first line: the requirements hash; then JSON)."""
    try:
        first, _, rest = marker.read_text().partition("\n")
        if first.strip() != wanted:
            return None
        facts = json.loads(rest)
    except (OSError, ValueError):
        return None
    return facts if isinstance(facts, dict) and facts.get("numpy") else None


def _probe_env(env_path: Path) -> dict[str, Any]:
    python = env_path / "bin" / "python"
    info = probe_python(python)
    info["numpy"] = check_server_numpy(python)
    return info


def _build_server_env(env_path: Path) -> None:
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


def _load_server_env(env_path: Path, facts: dict[str, Any]) -> ServerEnv:
    env = ServerEnv(
        path=env_path,
        python=env_path / "bin" / "python",
        site_packages=Path(facts["platlib"]),
        libdir=facts.get("libdir") or "",
        runtime_dir=env_path / _RUNTIME_DIR,
        numpy_version=str(facts["numpy"]),
    )
    installed = sorted(p.name for p in env.site_packages.glob("numpy-*.dist-info"))
    if installed != [f"numpy-{env.numpy_version}.dist-info"]:  # numpy changed since the probe: ask again
        env = dataclasses.replace(env, numpy_version=check_server_numpy(env.python))
    if not env.tritonserver.exists() or not env.python.exists():
        raise ServerEnvMissingError(
            f"{env.tritonserver} is missing: remove {env_path / _READY_MARKER} and run "
            f"`{prepare_command(env_path)}`."
        )
    return env
