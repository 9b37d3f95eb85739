"""The Ray Data peer's own virtual environment (stdlib only: imported by ``benchmarks/e2e.py``).

Ray's pins may clash with the project's (numpy, pyarrow, pandas, grpcio), so the peer runs in a venv of its
own, built with ``uv pip install`` from ``benchmarks/ray-requirements.txt`` and rebuilt when that file
changes (a hash stamp in the venv).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "ray-requirements.txt"
ENV_NAME = "ray-env"
_STAMP = ".ray-requirements.sha256"
#: Bump when the way the venv is built changes, so existing ones are rebuilt.
_LAYOUT_VERSION = "1"


def requirements_hash(requirements: Path = REQUIREMENTS) -> str:
    """Hash of the requirements, the layout version and this interpreter's major.minor."""
    digest = hashlib.sha256(requirements.read_bytes())
    digest.update(f"layout={_LAYOUT_VERSION};python={sys.version_info[0]}.{sys.version_info[1]}".encode())
    return digest.hexdigest()


def find_uv() -> str:
    """The ``uv`` binary: next to this interpreter, in the repository's ``.venv``, or on ``PATH``."""
    for candidate in (Path(sys.executable).parent / "uv", HERE.parent / ".venv" / "bin" / "uv"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("uv")
    if found is None:
        raise RuntimeError("uv not found (looked next to the interpreter, in .venv/bin and on PATH)")
    return found


def _base_python() -> str:
    """The interpreter this one's venv was made from (same major.minor), for ``uv venv``."""
    base = getattr(sys, "_base_executable", None)
    return base if base and Path(base).exists() else sys.executable


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (two benchmarks must not build the same venv at once)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"Building the Ray venv failed ({' '.join(cmd)} exited {result.returncode}):\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )


def ensure_ray_env(root: Path, requirements: Path = REQUIREMENTS) -> Path:
    """Create ``root/ray-env`` from ``requirements`` if it is missing or stale; return its interpreter.

    Quick (one file read and a hash) when the venv is already built for the same requirements.

    :param root: folder that holds the venv (created if missing).
    :param requirements: the pinned requirements file.
    """
    root = Path(root)
    env = root / ENV_NAME
    python = env / "bin" / "python"
    stamp = env / _STAMP
    wanted = requirements_hash(requirements)

    def ready() -> bool:
        return python.exists() and stamp.exists() and stamp.read_text().strip() == wanted

    if ready():
        return python
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{ENV_NAME}.lock"):
        if ready():  # built by another process while this one waited
            return python
        shutil.rmtree(env, ignore_errors=True)
        uv = find_uv()
        print(f"Building {env} from {requirements.name} ...", file=sys.stderr)
        common = ["--quiet", "--no-config", "--no-python-downloads"]
        _run([uv, "venv", *common, "--python", _base_python(), str(env)])
        _run([uv, "pip", "install", *common, "--python", str(python), "-r", str(requirements)])
        stamp.write_text(wanted + "\n")
    return python


if __name__ == "__main__":
    print(ensure_ray_env(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent / ".data"))
