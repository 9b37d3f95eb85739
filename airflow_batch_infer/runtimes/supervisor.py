"""Keeps a local ``tritonserver`` up for the length of a job, as a container runtime's restart policy does.

Run as ``python supervisor.py --ready-url URL --ready-file F --shm-prefix P -- CMD ...``. It starts CMD,
and when CMD dies *after* the server had once been ready (a crash, an OOM kill), starts it again with the
same arguments, so on the same ports; clients retrying with backoff then carry on. A server that exits
before it was ever ready is not restarted: the supervisor exits with its code, so a model that fails to
load fails the start at once. The server counts as ready once its readiness URL answers 200 or the
starting task has written the ready file. SIGTERM or SIGINT stop the server and the supervisor.
Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

POLL_SECONDS = 0.2


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


def supervise(
    command: list[str], ready_url: str, ready_file: str, shm_prefix: str, max_restarts: int, backoff: float
) -> int:
    """Run ``command`` until told to stop; restart it when it dies after the server was once ready.

    :param command: the server's argument list.
    :param ready_url: the server's ``/v2/health/ready`` URL.
    :param ready_file: a file the starting task writes once it saw the server ready.
    :param shm_prefix: prefix of the server's shared-memory regions, removed before a restart.
    :param max_restarts: restarts allowed in all; past them the supervisor exits with the server's code.
    :param backoff: seconds before the first restart, doubled for each next one (at most 30 s).
    :returns: the exit code to leave with.
    """
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    restarts = 0
    ever_ready = False
    while True:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        while (code := child.poll()) is None:
            if not ever_ready and (Path(ready_file).exists() or _ready(ready_url)):
                ever_ready = True
                print(f"[supervisor] server ready (pid {child.pid})", flush=True)
            time.sleep(POLL_SECONDS)
        if stopping:
            return code
        ever_ready = ever_ready or Path(ready_file).exists()
        if not ever_ready or restarts >= max_restarts:
            why = "before it was ever ready" if not ever_ready else f"and {restarts} restarts are spent"
            print(f"[supervisor] server exited with code {code} {why}; not restarting", flush=True)
            return code or 1
        restarts += 1
        wait = min(backoff * 2 ** (restarts - 1), 30.0)
        print(f"[supervisor] server died (code {code}); restart {restarts} in {wait:.1f} s", flush=True)
        _remove_shm(shm_prefix)
        time.sleep(wait)
        if stopping:
            return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready-url", required=True)
    parser.add_argument("--ready-file", default="")
    parser.add_argument("--shm-prefix", default="")
    parser.add_argument("--max-restarts", type=int, default=5)
    parser.add_argument("--backoff", type=float, default=1.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no server command given after --")
    return supervise(
        command, args.ready_url, args.ready_file, args.shm_prefix, args.max_restarts, args.backoff
    )


if __name__ == "__main__":
    sys.exit(main())
