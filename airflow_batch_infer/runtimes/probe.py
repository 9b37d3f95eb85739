"""Asking a Triton server over HTTP whether it, and its models, are ready: one prober, sync and async.

The questions and how their answers are read live in one place, :func:`_probe_steps`, a generator that
yields each request and is sent back the response (or the transport error). :func:`probe_server` drives
it with an ``httpx.Client`` (the local runtime's start, a reattaching start task), :func:`probe_server_async`
with an ``httpx.AsyncClient`` (``TritonServerReadyTrigger`` and the blocking wait of
:mod:`.readiness`). So both ask the same URLs and judge the answers alike.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import httpx

from airflow_batch_infer.runtimes.access import server_headers
from airflow_batch_infer.runtimes.base import ServerInfo

#: One request of a probe: method and path (a ``POST`` sends an empty JSON object).
Request = tuple[str, str]
Answer = httpx.Response | httpx.HTTPError | None


@dataclass
class Probe:
    """What one round of HTTP requests found out.

    :param answering: the server (ours, by its id) answers.
    :param ready: it and every model asked for are ready.
    :param error: why a model will never become ready (not in the repository, failed to load).
    :param models_ready: each model asked for → ready.
    :param foreign: another server (another id) answers at the address.
    """

    answering: bool = False
    ready: bool = False
    error: str | None = None
    models_ready: dict[str, bool] = field(default_factory=dict)
    foreign: bool = False


def server_name(response: httpx.Response) -> str | None:
    """The server id in a ``GET /v2`` answer (``None`` when it is not one)."""
    if response.status_code != 200:
        return None
    try:
        return response.json().get("name")
    except ValueError:
        return None


def _probe_steps(
    server_id: str | None, models: list[str], explain: bool
) -> Generator[Request, Answer, Probe]:
    """Ask ``/v2`` (identity), ``/v2/health/ready``, each model's ``ready`` and, if needed, the index.

    A model that the server does not have, or that it reports ``UNAVAILABLE`` with a reason, is an
    error: it will never become ready.
    """
    probe = Probe()
    try:
        meta = yield ("GET", "/v2")
    except httpx.HTTPError:
        return probe
    if meta.status_code != 200:
        return probe
    if server_id and server_name(meta) != server_id:
        probe.foreign = True
        return probe
    probe.answering = True
    try:
        server_ready = (yield ("GET", "/v2/health/ready")).status_code == 200
        for model in models:
            probe.models_ready[model] = (yield ("GET", f"/v2/models/{model}/ready")).status_code == 200
        if server_ready and all(probe.models_ready.values()):
            probe.ready = True
            return probe
        pending = [m for m, ready in probe.models_ready.items() if not ready]
        if pending and explain:
            index = yield ("POST", "/v2/repository/index")
            if index.status_code == 200:
                probe.error = _index_error(index.json(), pending)
    except httpx.HTTPError:
        probe.answering = False
    return probe


def _index_error(index: list[dict[str, Any]], pending: list[str]) -> str | None:
    entries: dict[str, list[dict[str, Any]]] = {}
    for entry in index:
        entries.setdefault(entry.get("name", ""), []).append(entry)
    available = sorted(entries)
    for model in pending:
        if model not in entries:
            return f"model {model!r} is not in the server's model repository (it has {available})"
        reasons = [
            e.get("reason") for e in entries[model] if e.get("state") == "UNAVAILABLE" and e.get("reason")
        ]
        if reasons:
            return f"model {model!r} failed to load: {reasons[0]}"
    return None


def client_options(server: ServerInfo | str, timeout: float) -> dict[str, Any]:
    """Keyword arguments of an ``httpx`` client for ``server``: its restricted-API key, a ``timeout``.

    No CA bundle is loaded for a plain-HTTP endpoint (it costs about 0.1 s per client).

    :param server: the server, or its HTTP URL (no key then).
    :param timeout: seconds for each request.
    """
    info = server if isinstance(server, ServerInfo) else None
    url = info.http_url if info else str(server)
    return {
        "timeout": httpx.Timeout(timeout),
        "headers": server_headers(info, "http") if info else {},  # the index is restricted with a key
        "verify": url.startswith("https://"),
    }


def probe_server(
    client: httpx.Client, http_url: str, server_id: str | None, models: list[str], explain: bool = True
) -> Probe:
    """Probe the server at ``http_url`` once, from synchronous code.

    :param client: a client made with :func:`client_options`.
    :param http_url: ``http://host:port``.
    :param server_id: the id the server must answer with (any when ``None``).
    :param models: models that must be ready.
    :param explain: when the server is up but a model is not, ask the repository index why.
    """
    steps, answer = _probe_steps(server_id, list(models), explain), None
    while not isinstance(step := _advance(steps, answer), Probe):
        answer = _send(client, step, http_url)
    return step


async def probe_server_async(
    client: httpx.AsyncClient, http_url: str, server_id: str | None, models: list[str]
) -> Probe:
    """:func:`probe_server` from a coroutine (the repository index explains a model that is not ready)."""
    steps, answer = _probe_steps(server_id, list(models), True), None
    while not isinstance(step := _advance(steps, answer), Probe):
        answer = await _send_async(client, step, http_url)
    return step


def _advance(steps: Generator[Request, Answer, Probe], answer: Answer) -> Request | Probe:
    """Give ``steps`` the last answer (an error is raised inside it); its next request, or its result."""
    try:
        return steps.throw(answer) if isinstance(answer, httpx.HTTPError) else steps.send(answer)
    except StopIteration as done:
        return done.value


def _request(http_url: str, step: Request) -> dict[str, Any]:
    method, path = step
    return {"method": method, "url": f"{http_url}{path}", "json": {} if method == "POST" else None}


def _send(client: httpx.Client, step: Request, http_url: str) -> Answer:
    try:
        return client.request(**_request(http_url, step))
    except httpx.HTTPError as exc:
        return exc


async def _send_async(client: httpx.AsyncClient, step: Request, http_url: str) -> Answer:
    try:
        return await client.request(**_request(http_url, step))
    except httpx.HTTPError as exc:
        return exc


def is_ready(info: ServerInfo, models: list[str] | None, timeout: float = 5.0) -> bool:
    """Whether the server of ``info`` (its id on its port) and ``models`` are ready now.

    :param info: the server.
    :param models: models that must be ready.
    :param timeout: seconds for each HTTP request.
    """
    with httpx.Client(**client_options(info, timeout)) as client:
        server_id = info.handle.get("server_id")
        return probe_server(client, info.http_url, server_id, list(models or [])).ready


def answers_as(http_url: str, server_id: str, timeout: float = 0.5) -> bool:
    """Whether the server ``server_id`` answers at ``http_url`` (its ``GET /v2`` name)."""
    if not http_url:
        return False
    with httpx.Client(**client_options(http_url, timeout)) as client:
        try:
            return server_name(client.get(f"{http_url}/v2")) == server_id
        except httpx.HTTPError:
            return False
