"""The keeper script that runs first in a server's container, run here as a real shell over a real process.

``sleep`` stands in for ``tritonserver`` (the script passes it signals and waits for it the same way); the
lease is a file whose modification time, or a downward-API annotations file whose renewal annotation, the
run moves forward.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from airflow_batch_infer.runtimes.container_keeper import (
    keeper_command,
    keeper_environment,
    lease_archive,
    stat_mtime,
)
from airflow_batch_infer.runtimes.labels import LEASE_RENEWED_KEY


def start_keeper(lease: Path, timeout: float) -> subprocess.Popen:
    env = {**os.environ, **keeper_environment(timeout, str(lease), check_interval=1)}
    return subprocess.Popen(keeper_command(["sleep", "300"]), env=env, stderr=subprocess.PIPE, text=True)


def test_the_server_lives_while_its_lease_file_is_renewed_and_stops_when_it_is_not(tmp_path: Path) -> None:
    lease = tmp_path / "lease"
    keeper = start_keeper(lease, timeout=3)
    try:
        for _ in range(5):  # 5 s of renewals, longer than the timeout
            time.sleep(1)
            lease.touch()
        assert keeper.poll() is None
        started = time.monotonic()
        keeper.wait(timeout=15)
        assert 3 <= time.monotonic() - started <= 10
        assert "the lease was not renewed for" in keeper.stderr.read()
        assert keeper.returncode == 128 + signal.SIGTERM  # the server was stopped by SIGTERM
    finally:
        keeper.kill()


def test_a_pod_lease_is_read_from_its_annotations_file(tmp_path: Path) -> None:
    annotations = tmp_path / "annotations"
    annotations.write_text(f'{LEASE_RENEWED_KEY}="{time.time() - 3600:.0f}"\nother="x"\n')
    keeper = start_keeper(annotations, timeout=600)  # renewed an hour ago, ten minutes allowed
    try:
        keeper.wait(timeout=15)
        assert "the lease was not renewed for 36" in keeper.stderr.read()
    finally:
        keeper.kill()
    annotations.write_text(f'{LEASE_RENEWED_KEY}="{time.time():.0f}"\n')
    keeper = start_keeper(annotations, timeout=600)
    try:
        time.sleep(3)
        assert keeper.poll() is None
    finally:
        keeper.kill()


def test_sigterm_to_the_keeper_stops_the_server_and_no_lease_means_no_expiry(tmp_path: Path) -> None:
    keeper = start_keeper(tmp_path / "never-written", timeout=0)
    try:
        time.sleep(2.5)
        assert keeper.poll() is None  # lease_timeout 0: the keeper never stops it
        keeper.send_signal(signal.SIGTERM)  # docker stop
        assert keeper.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        keeper.kill()


def test_a_renewal_archive_carries_its_time_as_the_files_modification_time() -> None:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(lease_archive(now=1_800_000_000.5))) as tar:
        member = tar.getmember("run/airflow-batch-infer/lease")
    assert int(member.mtime) == 1_800_000_000
    assert stat_mtime({"mtime": "2027-01-15T08:00:00.123456789Z"}) == 1_800_000_000.123456
    assert stat_mtime({}) is None
