"""Give the executor's slot back the moment a task process ends.

Airflow's task supervisor (Task SDK 1.3) reads a task process's sockets until each ends, then asks once,
without waiting, whether the process has exited. The kernel closes a process's files a fraction of a
millisecond before the process can be reaped; when the supervisor asks in between, it sleeps in ``select``
for up to ``[workers] min_heartbeat_interval`` (5 s) before it asks again, and holds its executor slot all
that time. Under the LocalExecutor on 2 cores, up to 4 of the demo run's 7 tasks held their slot 5 s after
they ended (``strace`` of the supervisor: the last EOF, a ``pidfd`` poll that finds the child running, the
child's ``SIGCHLD`` 0.3 ms later, then a 5 s ``epoll_wait``).

:func:`release_slot_at_exit` starts a small watcher process beside the task. It holds the task's stdout and
stderr (the supervisor's sockets) and a pidfd of the task, and exits when the task has exited. So the last
socket ends only once the task can be reaped, and the supervisor's one question finds it gone. The watcher
dies with the task however it ends (return, exception, SIGKILL); it is orphaned to the host's init, which
reaps it (the Airflow image runs ``dumb-init``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)

# Waits until the pidfd given as argv[1] is readable: its process has exited.
_WATCHER = "import select, sys; select.select([int(sys.argv[1])], [], [])"
_started_in: int | None = None
_watcher: subprocess.Popen[bytes] | None = None  # kept: a dropped Popen of a live child warns when collected


def supervised() -> bool:
    """Whether this process is a task process run by Airflow's supervisor (not ``dag.test()``)."""
    try:
        from airflow.sdk.execution_time import task_runner
        from airflow.sdk.execution_time.comms import CommsDecoder
    except ImportError:
        return False
    return isinstance(getattr(task_runner, "SUPERVISOR_COMMS", None), CommsDecoder)


def release_slot_at_exit(*, force: bool = False) -> subprocess.Popen[bytes] | None:
    """Start the exit watcher for this task process, once per process; a no-op outside the supervisor.

    :param force: start it even when this process is not run by Airflow's supervisor (tests).
    :return: the watcher, or None where none was started (already running, not supervised, no pidfd).
    """
    global _started_in, _watcher
    if _started_in == os.getpid() or not hasattr(os, "pidfd_open") or not (force or supervised()):
        return None
    try:
        pidfd = os.pidfd_open(os.getpid())
    except OSError as exc:
        log.debug("No exit watcher (pidfd_open: %s).", exc)
        return None
    try:
        watcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHER, str(pidfd)],
            stdin=subprocess.DEVNULL,
            pass_fds=(pidfd,),
        )
    except OSError as exc:
        log.debug("No exit watcher (%s).", exc)
        return None
    finally:
        os.close(pidfd)
    _started_in, _watcher = os.getpid(), watcher
    return watcher
