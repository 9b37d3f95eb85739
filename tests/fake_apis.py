"""Stand-ins for the two APIs that cannot exist on a test machine: a Docker Engine and a Kubernetes API.

They are small HTTP servers on 127.0.0.1 that answer the few endpoints the runtimes call, with the Engine's
and Kubernetes' JSON shapes, and record every request. The runtimes talk to them through the real docker SDK
(via ``DockerHook``) and the real kubernetes client (via ``KubernetesHook``), so what is tested is the
bytes those clients send, not calls on a mock object. Nothing else is faked.
"""

from __future__ import annotations

import base64
import io
import json
import posixpath
import re
import struct
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

DOCKER_API_VERSION = "1.47"


class _Handler(BaseHTTPRequestHandler):
    api: FakeApi

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw and raw[:1] in (b"{", b"[") else (raw or None)
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with self.api.lock:
            self.api.requests.append((self.command, parts.path, query, body))
            status, payload, content_type, *extra = self.api.route(self.command, parts.path, query, body)
        if isinstance(payload, (dict, list)):
            data = json.dumps(payload).encode()
            content_type = content_type or "application/json"
        else:
            data = payload if isinstance(payload, bytes) else str(payload or "").encode()
            content_type = content_type or "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra[0] if extra else {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle


class FakeApi:
    """An HTTP server on 127.0.0.1 that routes requests to :meth:`route` and records them."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        handler = type("Handler", (_Handler,), {"api": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str | None]:
        raise NotImplementedError

    def calls(self, method: str, pattern: str) -> list[tuple[str, str, dict[str, str], Any]]:
        return [r for r in self.requests if r[0] == method and re.search(pattern, r[1])]

    @contextmanager
    def running(self) -> Iterator[FakeApi]:
        self.thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


class FakeDockerEngine(FakeApi):
    """The Docker Engine API endpoints the docker runtime uses (images, containers, logs)."""

    def __init__(self, images: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.images = set(images)
        self.containers: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, str] = {}
        self.archives: dict[str, list[tuple[str | None, bytes]]] = {}  # files copied into containers
        self.fail_start: str | None = None
        self.url = f"tcp://127.0.0.1:{self.port}"

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str | None]:
        path = re.sub(r"^/v[0-9.]+", "", path)
        if path == "/version":
            return 200, {"ApiVersion": DOCKER_API_VERSION, "Version": "28.0.0", "MinAPIVersion": "1.24"}, None
        if path == "/_ping":
            return 200, "OK", None
        if method == "GET" and (m := re.fullmatch(r"/images/(.+)/json", path)):
            if m.group(1) in self.images:
                return 200, {"Id": "sha256:" + "0" * 64, "RepoTags": [m.group(1)]}, None
            return 404, {"message": f"No such image: {m.group(1)}"}, None
        if method == "POST" and path == "/images/create":
            self.images.add(f"{query['fromImage']}:{query.get('tag', 'latest')}")
            # The Engine streams progress chunked; one object is what an unchunked reply can carry.
            return 200, {"status": f"Downloaded newer image for {query['fromImage']}"}, None
        if method == "POST" and path == "/containers/create":
            return self._create(query.get("name", ""), body)
        if method == "GET" and path == "/containers/json":
            return 200, self._list(query), None
        m = re.fullmatch(r"/containers/([^/]+)(/[a-z]+)?", path)
        if not m:
            return 404, {"message": f"page not found: {path}"}, None
        container = self._find(m.group(1))
        if container is None:
            return 404, {"message": f"No such container: {m.group(1)}"}, None
        action = m.group(2)
        if method == "POST" and action == "/start":
            if self.fail_start:
                return 500, {"message": self.fail_start}, None
            self._start(container)
            return 204, b"", None
        if method == "GET" and action == "/json":
            return 200, container, None
        if method == "GET" and action == "/logs":
            lines = self.logs.get(container["Id"], "").splitlines()
            tail = query.get("tail", "all")
            if tail != "all":
                lines = lines[-int(tail) :]
            text = "".join(line + "\n" for line in lines).encode()
            return 200, struct.pack(">BxxxL", 1, len(text)) + text, "application/vnd.docker.raw-stream"
        if method == "PUT" and action == "/archive":
            self.archives.setdefault(container["Id"], []).append((query.get("path"), body))
            return 200, b"", None
        if method == "GET" and action == "/archive":
            return self._archive(container["Id"], query.get("path", ""))
        if method == "POST" and action == "/stop":
            self.exit(container["Id"], 0)
            return 204, b"", None
        if method == "DELETE" and action is None:
            if container["State"]["Running"] and query.get("force") not in ("1", "True", "true"):
                return 409, {"message": "container is running"}, None
            del self.containers[container["Id"]]
            return 204, b"", None
        return 404, {"message": f"unsupported: {method} {path}"}, None

    def _archive(self, container_id: str, path: str) -> tuple[Any, ...]:
        """The newest copy of ``path`` put into the container, with the Engine's path-stat header."""
        for base, data in reversed(self.archives.get(container_id, [])):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    if posixpath.join(base or "/", member.name) == path:
                        stat = {
                            "name": member.name.rsplit("/", 1)[-1],
                            "size": member.size,
                            "mode": member.mode,
                            "mtime": datetime.fromtimestamp(member.mtime, timezone.utc).isoformat(),
                            "linkTarget": "",
                        }
                        header = base64.b64encode(json.dumps(stat).encode()).decode()
                        return 200, data, "application/x-tar", {"X-Docker-Container-Path-Stat": header}
        return 404, {"message": f"Could not find the file {path} in container {container_id}"}, None

    def _find(self, ref: str) -> dict[str, Any] | None:
        for cid, container in self.containers.items():
            if cid == ref or cid.startswith(ref) or container["Name"] == "/" + ref:
                return container
        return None

    def _create(self, name: str, body: dict[str, Any]) -> tuple[int, Any, str | None]:
        if body["Image"] not in self.images:
            return 404, {"message": f"No such image: {body['Image']}"}, None
        if self._find(name):
            return 409, {"message": f"Conflict. The container name /{name} is already in use"}, None
        cid = uuid.uuid4().hex + uuid.uuid4().hex
        self.containers[cid] = {
            "Id": cid,
            "Name": "/" + name,
            "Created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "CreatedEpoch": time.time(),
            "Config": {**body, "Tty": False, "Labels": body.get("Labels") or {}},
            "HostConfig": body.get("HostConfig") or {},
            "State": {"Status": "created", "Running": False, "ExitCode": 0, "OOMKilled": False, "Error": ""},
            "NetworkSettings": {"Ports": {}},
        }
        return 201, {"Id": cid, "Warnings": []}, None

    def _start(self, container: dict[str, Any]) -> None:
        ports = {}
        for key, bindings in (container["HostConfig"].get("PortBindings") or {}).items():
            ports[key] = [
                {
                    "HostIp": b.get("HostIp") or "0.0.0.0",
                    "HostPort": b.get("HostPort") or str(32768 + len(ports)),
                }
                for b in bindings
            ]
        container["NetworkSettings"]["Ports"] = ports
        container["State"].update(Status="running", Running=True)

    def exit(self, cid: str, code: int, oom: bool = False) -> None:
        """Make a container exit, as if its process ended."""
        self.containers[cid]["State"].update(Status="exited", Running=False, ExitCode=code, OOMKilled=oom)

    def _list(self, query: dict[str, str]) -> list[dict[str, Any]]:
        filters = json.loads(query.get("filters") or "{}")
        wanted = filters.get("label", [])
        if isinstance(wanted, dict):
            wanted = [k for k, v in wanted.items() if v]
        found = []
        for container in self.containers.values():
            labels = container["Config"]["Labels"]
            ok = all(
                (labels.get(w.split("=", 1)[0]) == w.split("=", 1)[1]) if "=" in w else (w in labels)
                for w in wanted
            )
            if ok and (container["State"]["Running"] or query.get("all") in ("1", "True", "true")):
                found.append(
                    {
                        "Id": container["Id"],
                        "Names": [container["Name"]],
                        "Labels": labels,
                        "State": container["State"]["Status"],
                        "Created": int(container["CreatedEpoch"]),
                    }
                )
        return found


class FakeKubernetes(FakeApi):
    """The core/v1 endpoints the kubernetes runtime uses (Pods, Services, logs, events)."""

    def __init__(self) -> None:
        super().__init__()
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.network_policies: dict[tuple[str, str], dict[str, Any]] = {}
        self.logs: dict[str, str] = {}
        self.url = f"http://127.0.0.1:{self.port}"

    def kube_config(self, namespace: str = "default") -> dict[str, Any]:
        """A kubeconfig that points the kubernetes client at this server."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
            ],
            "current-context": "fake",
        }

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
                "message": message}  # fmt: skip

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, str | None]:
        m = re.fullmatch(
            r"/(?:api/v1|apis/networking\.k8s\.io/v1)/namespaces/([^/]+)/(pods|services|events|networkpolicies)"
            r"(?:/([^/]+))?(/log)?",
            path,
        )
        if not m:
            return 404, self._status(404, "NotFound", f"unknown path {path}"), None
        namespace, kind, name, log = m.groups()
        if kind == "events":
            return 200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": []}, None
        store = {"pods": self.pods, "services": self.services, "networkpolicies": self.network_policies}[kind]
        if method == "POST" and name is None:
            key = (namespace, body["metadata"]["name"])
            if key in store:
                return 409, self._status(409, "AlreadyExists", f"{kind} {key[1]} already exists"), None
            body["metadata"].update(
                uid=str(uuid.uuid4()),
                namespace=namespace,
                creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            if kind == "pods":
                body["status"] = {"phase": "Pending"}
            store[key] = body
            return 201, body, None
        if method == "GET" and name is None:
            selector = query.get("labelSelector", "")
            wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part)
            items = [
                obj
                for (ns, _), obj in store.items()
                if ns == namespace
                and all(obj["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
            ]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}, None
        obj = store.get((namespace, name))
        if obj is None:
            return 404, self._status(404, "NotFound", f'{kind} "{name}" not found'), None
        if method == "GET" and log:
            lines = self.logs.get(name, "").splitlines()
            if query.get("tailLines"):
                lines = lines[-int(query["tailLines"]) :]
            return 200, "".join(line + "\n" for line in lines), None
        if method == "GET":
            return 200, obj, None
        if method == "DELETE":
            del store[(namespace, name)]
            if kind == "pods":  # garbage collection: what the Pod owns goes with it
                uid = obj["metadata"]["uid"]
                for owned in (self.services, self.network_policies):
                    for key, dependent in list(owned.items()):
                        refs = dependent["metadata"].get("ownerReferences") or []
                        if any(ref.get("uid") == uid for ref in refs):
                            del owned[key]
            return 200, obj, None
        if method == "PATCH" and isinstance(body, dict):  # a merge patch of labels and annotations
            for key in ("labels", "annotations"):
                obj["metadata"].setdefault(key, {}).update((body.get("metadata") or {}).get(key) or {})
            return 200, obj, None
        return 404, self._status(404, "NotFound", f"unsupported {method} {path}"), None

    def set_pod_status(self, name: str, status: dict[str, Any], namespace: str = "default") -> None:
        """Set a Pod's status, as the kubelet would."""
        with self.lock:
            self.pods[(namespace, name)]["status"] = status
