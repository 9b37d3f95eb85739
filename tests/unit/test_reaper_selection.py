"""Which servers the reaper stops, and why: a pure function of what the host, the platform and Airflow say."""

from __future__ import annotations

from airflow_batch_infer.operators.reaper import select_orphans
from airflow_batch_infer.runtimes import ServerInfo, ServerOwner

NOW = 1_800_000_000.0
STATES = {("nightly", "live"): "running", ("nightly", "failed"): "failed", ("nightly", "done"): "success"}


def server(server_id: str, run_id: str | None, **handle: object) -> ServerInfo:
    owner = ServerOwner("nightly", run_id, "start_server").to_dict() if run_id else None
    return ServerInfo(
        "local", "", "", "", {"server_id": server_id, "owner": owner, "started_at": NOW - 3600, **handle}
    )


def reasons(servers: list[ServerInfo], **kwargs: object) -> dict[str, str]:
    found = select_orphans(
        servers, lambda d, r: STATES.get((d, r)), now=NOW, min_age=kwargs.pop("min_age", 600), **kwargs
    )
    return {info.handle["server_id"]: reason for info, reason in found}


def test_each_reason_and_the_live_server_spared() -> None:
    servers = [
        server("abi-live", "live", state="running", keeper="alive", lease_age=10.0, lease_timeout=1800),
        server("abi-expired", "live", state="running", keeper="alive", lease_age=2000.0, lease_timeout=1800),
        server("abi-keeperless", "live", state="running", keeper="gone"),
        server("abi-failed", "failed", state="running", keeper="alive"),
        server("abi-done", "done", state="running", keeper="alive"),
        server("abi-gone", "manual__gone", state="running", keeper="alive"),
        server("abi-unowned", None, state="running", keeper="alive"),
    ]
    assert reasons(servers) == {
        "abi-expired": "its lease expired: not renewed for 2000 s (lease_timeout 1800 s)",
        "abi-keeperless": "its keeper is gone: the supervisor died and left the server running",
        "abi-failed": "DAG run nightly / failed is no longer queued or running (failed)",
        "abi-done": "DAG run nightly / done is no longer queued or running (success)",
        "abi-gone": "DAG run nightly / manual__gone is no longer queued or running (unknown to Airflow)",
    }
    assert "abi-unowned" in reasons(servers, stop_unowned=True)


def test_young_servers_are_spared_for_their_run_state_not_for_their_lease() -> None:
    young = {"started_at": NOW - 5, "state": "running", "keeper": "alive"}
    servers = [
        server("abi-young-failed", "failed", **young),
        server("abi-young-expired", "live", **young, lease_age=9.0, lease_timeout=3),
    ]
    assert reasons(servers) == {
        "abi-young-expired": "its lease expired: not renewed for 9 s (lease_timeout 3 s)",
    }


def test_a_container_lease_is_read_from_its_renewal_label() -> None:
    servers = [
        server("abi-pod-old", "live", state="Running", lease_renewed_at=NOW - 4000, lease_timeout=1800),
        server("abi-pod-new", "live", state="Running", lease_renewed_at=NOW - 60, lease_timeout=1800),
    ]
    assert list(reasons(servers)) == ["abi-pod-old"]
