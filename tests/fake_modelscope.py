"""A stand-in for the ModelScope hub HTTP API on 127.0.0.1, for upload tests that send nothing off the machine.

It answers the endpoints the modelscope-hub SDK (0.5, shipped with modelscope 1.40) uses to publish
a model, with the same envelopes: OpenAPI `{"success", "data"}` and legacy `{"Code", "Success",
"Message", "Data"}`. It keeps repositories in memory (visibility + file bytes), checks the token on
every call, verifies that each PUT blob hashes to its oid, applies commits, and records every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PRIVATE, PUBLIC = 1, 5
MODEL_EXISTS_CODE = 10010101001  # the China site's "model already exists" business code


@dataclass
class Repo:
    visibility: int
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    query: dict
    json: object
    body_size: int
    authorized: bool


class FakeModelScope:
    def __init__(self, token: str, username: str = "alice"):
        self.token = token
        self.username = username
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.fail_commits = False  # answer every commit with a server error (an outage mid-upload)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeModelScope":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], visibility: int = PUBLIC) -> None:
        self.repos[repo_id] = Repo(visibility, dict(files))

    def calls(self, method: str, pattern: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and re.fullmatch(pattern, r.path)]

    # ------------------------------------------------------------------ HTTP
    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Content-Length") is not None:
                    return self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return b""

            def _send(self, status: int, payload) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urlsplit(self.path)
                raw = self._body()
                try:
                    body = json.loads(raw) if raw and method != "PUT" else None
                except ValueError:
                    body = None
                authorized = self.headers.get("Authorization") == f"Bearer {hub.token}"
                with hub._lock:
                    hub.requests.append(Request(method, url.path, parse_qs(url.query), body, len(raw), authorized))
                    status, payload = hub._route(method, url.path, body, raw, authorized)
                self._send(status, payload)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

        return Handler

    def _route(self, method: str, path: str, body, raw: bytes, authorized: bool):
        legacy_ok = lambda data: (200, {"Code": 200, "Success": True, "Message": "", "Data": data})  # noqa: E731
        if path.startswith("/openapi/") and not authorized:
            return 401, {"success": False, "code": "InvalidAuthentication", "message": "invalid or expired token"}
        if not path.startswith("/openapi/") and not authorized:
            return 401, {"Code": 10010103009, "Success": False, "Message": "AccessToken is invalid or expired"}

        if method == "GET" and path == "/openapi/v1/users/me":
            return 200, {"success": True, "data": {"username": self.username}}
        if m := re.fullmatch(r"/openapi/v1/models/([^/]+)/([^/]+)", path):
            repo = self.repos.get(f"{m[1]}/{m[2]}")
            if repo is None:
                return 404, {"success": False, "code": "ResourceNotFound", "message": "model not found"}
            return 200, {"success": True, "data": {"id": f"{m[1]}/{m[2]}", "private": repo.visibility == PRIVATE}}
        if method == "POST" and path == "/api/v1/models":
            repo_id = f"{body['Path']}/{body['Name']}"
            if repo_id in self.repos:
                return 400, {"Code": MODEL_EXISTS_CODE, "Success": False, "Message": "model already exists"}
            self.repos[repo_id] = Repo(int(body["Visibility"]))
            return legacy_ok({"Path": body["Path"], "Name": body["Name"], "Visibility": body["Visibility"]})
        if m := re.fullmatch(r"/api/v1/models/([^/]+)/([^/]+)", path):
            repo = self.repos.get(f"{m[1]}/{m[2]}")
            if repo is None:
                return 404, {"Code": 10010101002, "Success": False, "Message": "model does not exist"}
            return legacy_ok({"Path": m[1], "Name": m[2], "Visibility": repo.visibility})
        if m := re.fullmatch(r"/api/v1/models/([^/]+)/([^/]+)/repo/files", path):
            repo = self.repos.get(f"{m[1]}/{m[2]}")
            if repo is None:
                return 404, {"Code": 10010101002, "Success": False, "Message": "model does not exist"}
            files = [{"Path": p, "Name": p.rsplit("/", 1)[-1], "Size": len(b), "Type": "blob",
                      "Sha256": hashlib.sha256(b).hexdigest()} for p, b in sorted(repo.files.items())]
            return legacy_ok({"Files": files})
        if m := re.fullmatch(r"/api/v1/repos/models/([^/]+)/([^/]+)/info/lfs/objects/batch", path):
            if f"{m[1]}/{m[2]}" not in self.repos:
                return 404, {"Code": 10010101002, "Success": False, "Message": "model does not exist"}
            objects = [{"oid": o["oid"], "size": o["size"],
                        "actions": {"upload": {"href": f"{self.endpoint}/lfs-upload/{o['oid']}"}}}
                       for o in body["objects"] if o["oid"] not in self.blobs]
            return legacy_ok({"objects": objects})
        if method == "PUT" and (m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)):
            if hashlib.sha256(raw).hexdigest() != m[1]:
                return 400, {"Code": 400, "Success": False, "Message": "blob does not match its oid"}
            self.blobs[m[1]] = raw
            return 200, None
        if m := re.fullmatch(r"/api/v1/repos/models/([^/]+)/([^/]+)/commit/([^/]+)", path):
            if self.fail_commits:
                return 500, {"Code": 500, "Success": False, "Message": "internal error, please retry later"}
            repo = self.repos.get(f"{m[1]}/{m[2]}")
            if repo is None:
                return 404, {"Code": 10010101002, "Success": False, "Message": "model does not exist"}
            for action in body["actions"]:
                if action["type"] == "lfs":
                    if action["sha256"] not in self.blobs:
                        return 400, {"Code": 400, "Success": False, "Message": f"missing blob for {action['path']}"}
                    repo.files[action["path"]] = self.blobs[action["sha256"]]
                else:
                    repo.files[action["path"]] = base64.b64decode(action["content"])
            return legacy_ok({"CommitId": hashlib.sha1(raw).hexdigest()})
        return 404, {"Code": 404, "Success": False, "Message": f"no route {method} {path}"}
