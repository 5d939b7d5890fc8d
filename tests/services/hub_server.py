"""A Hugging Face Hub stand-in over local folders, for the online ``hf://`` path.

The real Hub cannot be reached from here, so this serves the few routes that huggingface_hub's
``HfApi.dataset_info`` and ``HfFileSystem`` call, in the Hub's JSON shapes, over one folder per
dataset repo at one commit:

- ``GET /api/datasets/{repo}[/revision/{rev}]``           repo info with the commit ``sha``
- ``GET /api/datasets/{repo}/tree/{rev}[/{path}]``        a folder's entries (``recursive``)
- ``POST /api/datasets/{repo}/paths-info/{rev}``          entries for the ``paths`` asked
- ``GET|HEAD /datasets/{repo}/resolve/{rev}/{path}``       file bytes, honouring ``Range``

With ``token`` set, every request must carry ``Authorization: Bearer <token>`` (else 401), so a
test sees that the token reached each process that reads. Every request is recorded (method,
route, bytes sent) for the test to inspect. Point clients at it with ``HF_ENDPOINT``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


class HubServer:
    def __init__(self, repos: dict[str, Path], token: str | None = None):
        self.repos = {name: Path(root) for name, root in repos.items()}
        self.sha = {name: hashlib.sha1(name.encode()).hexdigest() for name in self.repos}
        self.token = token
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_HEAD(self):
                hub._handle(self, "HEAD")

            def do_POST(self):
                hub._handle(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------------ routes

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        authorized = not self.token or h.headers.get("Authorization") == f"Bearer {self.token}"
        record = {"method": method, "path": unquote(url.path), "range": h.headers.get("Range"),
                  "bytes": 0, "authorized": authorized}
        with self._lock:
            self.requests.append(record)
        if not authorized:
            return self._json(h, 401, {"error": "Invalid credentials in Authorization header"})
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?", url.path)
        if m and method == "GET":
            repo = self._repo(h, m.group(1), unquote(m.group(2) or "main"))
            if repo:
                self._json(h, 200, {"id": repo, "sha": self.sha[repo], "private": False,
                                    "siblings": [{"rfilename": p} for p in self._files(repo)]})
            return
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", url.path)
        if m and method == "GET":
            repo = self._repo(h, m.group(1), unquote(m.group(2)))
            if repo:
                folder = unquote(m.group(3) or "").strip("/")
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                base = self.repos[repo] / folder
                if not base.is_dir():
                    return self._missing(h, "EntryNotFound", folder)
                found = base.rglob("*") if recursive else base.iterdir()
                self._json(h, 200, [self._entry(repo, p) for p in sorted(found)])
            return
        m = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", url.path)
        if m and method == "POST":
            repo = self._repo(h, m.group(1), unquote(m.group(2)))
            if repo:
                body = h.rfile.read(int(h.headers.get("Content-Length") or 0)).decode()
                paths = parse_qs(body).get("paths", [])
                hits = [self.repos[repo] / p for p in paths]
                self._json(h, 200, [self._entry(repo, p) for p in hits if p.exists()])
            return
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path)
        if m and method in ("GET", "HEAD"):
            repo = self._repo(h, m.group(1), unquote(m.group(2)))
            if repo:
                self._file(h, repo, unquote(m.group(3)), method, record)
            return
        self._json(h, 404, {"error": f"no route {method} {url.path}"})

    def _repo(self, h, name: str, revision: str) -> str | None:
        if name not in self.repos:
            self._missing(h, "RepoNotFound", name)
            return None
        if revision not in ("main", self.sha[name]):
            self._missing(h, "RevisionNotFound", revision)
            return None
        return name

    def _files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def _entry(self, repo: str, path: Path) -> dict:
        rel = path.relative_to(self.repos[repo]).as_posix()
        oid = hashlib.sha1(f"{repo}/{rel}".encode()).hexdigest()
        if path.is_dir():
            return {"type": "directory", "path": rel, "oid": oid}
        return {"type": "file", "path": rel, "size": path.stat().st_size, "oid": oid}

    def _file(self, h, repo: str, rel: str, method: str, record: dict) -> None:
        path = self.repos[repo] / rel
        if not path.is_file():
            return self._missing(h, "EntryNotFound", rel)
        data = path.read_bytes()
        status, start, end = 200, 0, len(data)
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
        if rng:
            start = int(rng.group(1))
            end = min(len(data), int(rng.group(2)) + 1 if rng.group(2) else len(data))
            status = 206
        body = data[start:end]
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", self.sha[repo])
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        h.end_headers()
        if method == "GET":
            h.wfile.write(body)
            record["bytes"] = len(body)

    def _missing(self, h, code: str, what: str) -> None:
        self._json(h, 404, {"error": f"{code}: {what}"}, {"X-Error-Code": code})

    @staticmethod
    def _json(h, status: int, payload, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
