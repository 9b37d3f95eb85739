"""The keeper of a local ``tritonserver``: the server dies with it, restarts when it crashes, stops when its
lease runs out.

Run as ``python supervisor.py --server-id ID --ready-url URL ... -- CMD ...``, in a session of its own. It
starts CMD with a parent-death signal (``PR_SET_PDEATHSIG`` = SIGKILL, set in the child between fork and
exec), so that the server dies with its supervisor whatever kills the supervisor, SIGKILL included. The
server's model stubs are its own children, whose death signal Triton does not set: they notice their
parent's death only once it is reaped, which an init that reaps late can delay. So the supervisor also
starts a guard, a small process with a parent-death signal of its own (SIGTERM), that SIGKILLs the whole
process group (server and stubs) when the supervisor is gone, for whatever reason.

- When CMD dies *after* the server had once been ready (a crash, an OOM kill), it is started again with the
  same arguments, so on the same ports; clients retrying with backoff then carry on. A server that exits
  before it was ever ready is not restarted: the supervisor exits with its code, so a model that fails to
  load fails the start at once. The server counts as ready once its readiness URL answers 200 or the
  starting task has written the ready file.
- The lease file's modification time is the run's last sign of life (the start task, each infer task while
  it streams, persist renew it). When it is older than ``--lease-timeout`` seconds, the supervisor stops the
  server, removes its shared memory, model repository copy and lease, writes why in the ``stopped`` file
  next to the lease, and exits.
- SIGTERM or SIGINT stop the server (SIGTERM, then SIGKILL after ``--stop-grace`` seconds) and the supervisor.

Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

POLL_SECONDS = 0.1
PR_SET_PDEATHSIG = 1
#: Exit code when the lease ran out (the server was stopped on purpose).
LEASE_EXPIRED_EXIT = 3


def _log(message: str) -> None:
    print(f"[supervisor] {message}", flush=True)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback http only
            return response.status == 200
    except OSError:
        return False


def _remove_shm(prefix: str) -> None:
    """A killed server leaves its Python backend's shared-memory regions behind."""
    if prefix:
        for region in Path("/dev/shm").glob(f"{prefix}*"):  # noqa: S108 - the server's own regions
            with contextlib.suppress(OSError):
                region.unlink()


def die_with_parent(parent: int) -> None:
    """In the child, between fork and exec: be SIGKILLed when ``parent`` (the supervisor) dies.

    Async-signal-safe enough for a single-threaded parent: one ``prctl`` call and one ``getppid``. When the
    parent died before the ``prctl`` took effect, the child exits at once instead of running unkept.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(126)
    if os.getppid() != parent:
        os._exit(125)


#: The guard: when its parent (the supervisor) dies, it kills the process group: server, stubs, itself.
GUARD = """
import ctypes, os, signal, sys
def kill_group(*_):
    os.killpg(0, signal.SIGKILL)
signal.signal(signal.SIGTERM, kill_group)
if ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != int(sys.argv[1]):
    kill_group()
while True:
    signal.pause()
"""


def start_guard(server_id: str) -> subprocess.Popen[bytes]:
    """Start the guard of this supervisor's process group (its command line carries the server's id)."""
    return subprocess.Popen(
        [sys.executable, "-c", GUARD, str(os.getpid()), f"--id={server_id}"], stdin=subprocess.DEVNULL
    )


def lease_age(lease_file: str) -> float | None:
    """Seconds since the lease was last renewed (its modification time); ``None`` when it has no file."""
    try:
        return time.time() - os.stat(lease_file).st_mtime
    except OSError:
        return None


class Supervisor:
    """Runs the server command and keeps it (see the module's docstring).

    :param command: the server's argument list.
    :param ready_url: the server's ``/v2/health/ready`` URL.
    :param ready_file: a file the starting task writes once it saw the server ready.
    :param shm_prefix: prefix of the server's shared-memory regions, removed after the server dies.
    :param max_restarts: restarts allowed in all; past them the supervisor exits with the server's code.
    :param backoff: seconds before the first restart, doubled for each next one (at most 30 s).
    :param lease_file: the lease; its modification time is the run's last renewal ("" for no lease).
    :param lease_timeout: seconds a lease may go without renewal before the server is stopped.
    :param stop_grace: seconds between SIGTERM and SIGKILL when stopping the server.
    :param workdir: the server's folder (its ``models`` copy is removed when the lease runs out).
    :param server_id: the server's id; with it, a guard kills the process group when the supervisor dies.
    """

    def __init__(
        self,
        command: list[str],
        ready_url: str,
        ready_file: str = "",
        shm_prefix: str = "",
        max_restarts: int = 5,
        backoff: float = 1.0,
        lease_file: str = "",
        lease_timeout: float = 0,
        stop_grace: float = 0.0,
        workdir: str = "",
        server_id: str = "",
    ) -> None:
        self.server_id = server_id
        self.command = command
        self.ready_url = ready_url
        self.ready_file = ready_file
        self.shm_prefix = shm_prefix
        self.max_restarts = max_restarts
        self.backoff = backoff
        self.lease_file = lease_file
        self.lease_timeout = lease_timeout
        self.stop_grace = stop_grace
        self.workdir = workdir
        self.stopping = False
        self.child: subprocess.Popen[bytes] | None = None

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signum)

    def _spawn(self) -> subprocess.Popen[bytes]:
        parent = os.getpid()
        return subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, preexec_fn=lambda: die_with_parent(parent)
        )

    def _stop_child(self) -> int | None:
        """SIGTERM the server, SIGKILL it after ``stop_grace``; return its exit code."""
        child = self.child
        if child is None:
            return None
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
            try:
                child.wait(timeout=self.stop_grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                child.wait()
        _remove_shm(self.shm_prefix)
        return child.returncode

    def _lease_expired(self) -> float | None:
        if not self.lease_file or self.lease_timeout <= 0:
            return None
        age = lease_age(self.lease_file)
        if age is None or age > self.lease_timeout:
            return age if age is not None else float("inf")
        return None

    def _expire(self, age: float) -> int:
        why = (
            f"lease not renewed for {age:.0f} s (lease_timeout {self.lease_timeout:g} s)"
            if age != float("inf")
            else "lease file is gone"
        )
        _log(f"{why}: stopping the server")
        self.stopping = True
        self._stop_child()
        if self.workdir:
            with contextlib.suppress(OSError):
                Path(self.workdir, "stopped").write_text(f"{time.time():.3f} {why}\n")
            shutil.rmtree(Path(self.workdir) / "models", ignore_errors=True)
        if self.lease_file:  # a late renewal then says the server is gone, instead of renewing nothing
            with contextlib.suppress(OSError):
                os.unlink(self.lease_file)
        _log("server stopped: lease expired")
        return LEASE_EXPIRED_EXIT

    def run(self) -> int:
        """Run until told to stop or the lease runs out; return the exit code to leave with."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        with contextlib.suppress(OSError):  # a session of its own, also when not started with one
            if os.getsid(0) != os.getpid():
                os.setsid()
        if self.server_id:
            start_guard(self.server_id)
        restarts = 0
        ever_ready = False
        while True:
            self.child = self._spawn()
            while (code := self.child.poll()) is None:
                if self.stopping:
                    return self._stop_child() or 0
                age = self._lease_expired()
                if age is not None:
                    return self._expire(age)
                if not ever_ready and (Path(self.ready_file).exists() or _ready(self.ready_url)):
                    ever_ready = True
                    _log(f"server ready (pid {self.child.pid})")
                time.sleep(POLL_SECONDS)
            _remove_shm(self.shm_prefix)
            if self.stopping:
                return code
            ever_ready = ever_ready or Path(self.ready_file).exists()
            if not ever_ready or restarts >= self.max_restarts:
                why = "before it was ever ready" if not ever_ready else f"and {restarts} restarts are spent"
                _log(f"server exited with code {code} {why}; not restarting")
                return code or 1
            restarts += 1
            wait = min(self.backoff * 2 ** (restarts - 1), 30.0)
            _log(f"server died (code {code}); restart {restarts} in {wait:.1f} s")
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.stopping:
                    return code
                time.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server-id", default="", help="the server's id (a marker in this command line)")
    parser.add_argument("--ready-url", required=True)
    parser.add_argument("--ready-file", default="")
    parser.add_argument("--shm-prefix", default="")
    parser.add_argument("--max-restarts", type=int, default=5)
    parser.add_argument("--backoff", type=float, default=1.0)
    parser.add_argument("--lease-file", default="")
    parser.add_argument("--lease-timeout", type=float, default=0)
    parser.add_argument("--stop-grace", type=float, default=0.0)
    parser.add_argument("--workdir", default="")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no server command given after --")
    return Supervisor(
        command,
        args.ready_url,
        ready_file=args.ready_file,
        shm_prefix=args.shm_prefix,
        max_restarts=args.max_restarts,
        backoff=args.backoff,
        lease_file=args.lease_file,
        lease_timeout=args.lease_timeout,
        stop_grace=args.stop_grace,
        workdir=args.workdir,
        server_id=args.server_id,
    ).run()


if __name__ == "__main__":
    sys.exit(main())
