"""What a local server's log says: its last lines, its own error lines, and the lines that end a start."""

from __future__ import annotations

import os

PORT_CLASH_HINTS = ("address already in use", "address in use", "failed to listen", "failed to bind")
#: The server stays in "loading" forever after these (the stub process is gone): fail at once.
HANG_HINTS = ("Failed to preinitialize Python stub",)
_NOISE = ("CudaDriverHelper has not been initialized",)


def read_tail(path: str | os.PathLike[str] | None, lines: int = 40) -> str:
    """The last ``lines`` lines of the file at ``path`` ("" when there is none).

    :param path: the server's ``server.log``.
    :param lines: how many lines.
    """
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


def server_errors(text: str, limit: int = 10) -> list[str]:
    """The server's own error lines (glog ``E`` lines and ``error:``), without the harmless CUDA one."""
    errors = []
    for line in text.splitlines():
        is_error = (line[:1] == "E" and line[1:5].isdigit()) or line.startswith("error:")
        if is_error and not any(noise in line for noise in _NOISE):
            errors.append(line if len(line) <= 600 else line[:600] + " ...")
    return errors[-limit:]
