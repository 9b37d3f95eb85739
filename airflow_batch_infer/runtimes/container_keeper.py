"""The keeper inside a server's container: it stops ``tritonserver`` when the run stops renewing its lease.

A container's labels cannot change, so its lease lives where the run can renew it and the container can
read it:

- **docker**: a file, :data:`LEASE_FILE`, that each renewal copies into the container (``put_archive``)
  with the renewal's time as its modification time; the reaper reads that time back (``get_archive``).
- **kubernetes**: the Pod's ``airflow-batch-infer/lease-renewed-at`` annotation, which each renewal
  patches and the kubelet mirrors into a downward-API file, :data:`POD_ANNOTATIONS_FILE` (within about a
  minute).

The container's first process is a small POSIX shell script, :data:`KEEPER_SCRIPT`, that runs
``tritonserver`` as its child, passes it ``SIGTERM``, and every ``check_interval`` seconds compares the
lease's last renewal (the container's start until the first renewal) with ``lease_timeout``: past it, it
sends ``SIGTERM`` to ``tritonserver`` (``SIGKILL`` a minute later) and the container exits. So a server
whose run died stops by itself, on every host, without the reaper.
"""

from __future__ import annotations

import io
import tarfile
import time
from datetime import datetime

#: The lease file of a docker server, inside its container.
LEASE_FILE = "/run/airflow-batch-infer/lease"
#: Where a Pod's annotations appear in its container (a downward-API volume).
POD_ANNOTATIONS_FILE = "/etc/airflow-batch-infer/annotations"
#: Seconds between two looks at the lease.
DEFAULT_CHECK_INTERVAL = 15

KEEPER_SCRIPT = r"""
timeout=${BATCH_INFER_LEASE_TIMEOUT%.*}
interval=${BATCH_INFER_LEASE_CHECK:-15}
lease=$BATCH_INFER_LEASE_FILE
started=$(date +%s)
renewed_at() {
  case "$lease" in
    *annotations)
      at=$(sed -n 's|^airflow-batch-infer/lease-renewed-at="\([0-9]*\).*"$|\1|p' "$lease" 2>/dev/null) ;;
    *) at=$(stat -c %Y "$lease" 2>/dev/null) ;;
  esac
  echo "${at:-$started}"
}
"$@" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null' TERM INT
while kill -0 "$server" 2>/dev/null; do
  sleep "$interval" &
  wait $!
  [ "${timeout:-0}" -gt 0 ] 2>/dev/null || continue
  age=$(( $(date +%s) - $(renewed_at) ))
  if [ "$age" -gt "$timeout" ]; then
    echo "airflow-batch-infer keeper: the lease was not renewed for $age s" \
      "(lease_timeout $timeout s): stopping tritonserver." >&2
    kill -TERM "$server" 2>/dev/null
    (sleep 60; kill -KILL "$server") >/dev/null 2>&1 &
    break
  fi
done
wait "$server"
"""


def keeper_command(command: list[str]) -> list[str]:
    """``command`` (tritonserver's) run under the keeper, which reads its settings from
    :func:`keeper_environment`."""
    return ["/bin/sh", "-c", KEEPER_SCRIPT, "airflow-batch-infer-keeper", *command]


def keeper_environment(
    lease_timeout: float, lease_file: str = LEASE_FILE, check_interval: float = DEFAULT_CHECK_INTERVAL
) -> dict[str, str]:
    """The keeper's settings, as environment variables of the container (0 seconds: no lease)."""
    return {
        "BATCH_INFER_LEASE_TIMEOUT": str(int(lease_timeout or 0)),
        "BATCH_INFER_LEASE_FILE": lease_file,
        "BATCH_INFER_LEASE_CHECK": str(int(check_interval)),
    }


def file_archive(path: str, data: bytes, mode: int = 0o444, mtime: float | None = None) -> bytes:
    """A tar archive holding ``path`` (absolute, its folders included) with ``data``, for ``put_archive`` at
    ``/``.

    :param path: the file's absolute path in the container.
    :param data: its content.
    :param mode: its permissions.
    :param mtime: its modification time (epoch seconds); now when ``None``.
    """
    buffer = io.BytesIO()
    stamp = time.time() if mtime is None else mtime
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            folder = tarfile.TarInfo("/".join(parts[:depth]))
            folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, stamp
            tar.addfile(folder)
        member = tarfile.TarInfo("/".join(parts))
        member.size, member.mode, member.mtime = len(data), mode, stamp
        tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def lease_archive(now: float | None = None) -> bytes:
    """The lease file of a renewal made at ``now``: its modification time is the renewal."""
    stamp = time.time() if now is None else now
    return file_archive(LEASE_FILE, f"{stamp:.3f}\n".encode(), mode=0o644, mtime=stamp)


def stat_mtime(stat: dict) -> float | None:
    """The modification time (epoch seconds) in the Engine's path stat (``get_archive``'s second value)."""
    value = stat.get("mtime") if stat else None
    if not value:
        return None
    text = str(value)
    if "." in text:  # the Engine gives nanoseconds; Python parses microseconds
        head, _, tail = text.partition(".")
        digits = "".join(c for c in tail if c.isdigit())
        zone = tail[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
