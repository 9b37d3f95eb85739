"""Security properties a user can check: the local server listens on loopback only, and the package
starts processes from argument lists, never through a shell."""

from __future__ import annotations

import ast
import ipaddress
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PACKAGE = Path(__file__).resolve().parents[2] / "airflow_batch_infer"
LISTEN = "0A"


def listening_addresses(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses of the TCP sockets listening on ``port``, from /proc/net/tcp and /proc/net/tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == LISTEN and int(port_hex, 16) == port:
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(ipaddress.ip_address(packed))
    return found


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_the_local_server_listens_on_loopback_only(triton_server) -> None:
    handle = triton_server.handle
    for name in ("http_port", "grpc_port", "metrics_port"):
        addresses = listening_addresses(handle[name])
        assert addresses, f"nothing listens on {name} {handle[name]}"
        assert all(is_loopback(a) for a in addresses), f"{name} {handle[name]} listens on {addresses}"


def test_subprocesses_take_argument_lists_never_a_shell() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name in {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"}:
                offenders.append(f"{path.name}:{node.lineno} {name}")
            for keyword in node.keywords:
                if keyword.arg == "shell" and not (
                    isinstance(keyword.value, ast.Constant) and not keyword.value.value
                ):
                    offenders.append(f"{path.name}:{node.lineno} shell={ast.unparse(keyword.value)}")
    assert offenders == []
