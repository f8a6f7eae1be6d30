"""A tiny Hugging Face Hub stand-in for tests (stdlib only): enough of the HTTP API for huggingface_hub 2.x's
`HfApi.create_repo` / `create_branch` / `upload_folder` (preupload -> commit with inline base64 files, no LFS or
Xet: set HF_HUB_DISABLE_XET=1), `repo_info` / `model_info`, tree listing, `whoami`, the agent-harness registry,
and file download (`snapshot_download`, `hf_hub_download`, HEAD + GET on /{repo}/resolve/{revision}/{path}).

    with FakeHub(token="hf_x") as hub:        # serves on 127.0.0.1:<free port> in a thread
        env["HF_ENDPOINT"] = hub.endpoint
        ...
        hub.repos["user/name"].files()        # {path: bytes} at main
        hub.requests / hub.commits / hub.unknown

Requests it does not implement get a 404 and are recorded in `hub.unknown` (and printed to stderr) so a test
can show what a new huggingface_hub asks for. The token is checked on write requests (401 otherwise).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "fake-user"
_REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    branches: dict[str, str] = field(default_factory=dict)  # name -> sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def files(self, revision: str = "main") -> dict[str, bytes]:
        return dict(self.commits[self.resolve(revision)])


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    paths: list[str]
    oid: str


class FakeHub:
    def __init__(self, token: str | None = None, host: str = "127.0.0.1"):
        self.token = token  # None: accept any Bearer token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.create_payloads: list[dict] = []
        self.commits: list[Commit] = []
        self.unknown: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state ---------------------------------------------------------------------------------------

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        sha = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
        repo.commits[sha] = initial
        repo.branches["main"] = sha
        self.repos[repo_id] = repo
        return repo


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None):
        if body is None:
            body = json.dumps(payload if payload is not None else {}).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            self._error(401, "Invalid username or password.")
            return False
        if self.hub.token is not None and auth[len("Bearer "):] != self.hub.token:
            # Like a careless server, echo what it got: the client must scrub it.
            self._error(401, f"Invalid credentials in Authorization header ({auth})")
            return False
        return True

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is not None and repo.private:  # private repos: only with the token (else "not found")
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or (self.hub.token is not None and auth != f"Bearer {self.hub.token}"):
                repo = None
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, revision: str) -> str | None:
        sha = repo.resolve(unquote(revision))
        if sha is None:
            self._error(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return sha

    def _unknown(self):
        self.hub.unknown.append((self.command, self.path))
        print(f"[fake hub] unhandled {self.command} {self.path}", file=sys.stderr, flush=True)
        self._error(404, f"fake hub: {self.command} {urlsplit(self.path).path} is not implemented")

    def _dispatch(self, routes):
        url = urlsplit(self.path)
        self.hub.requests.append((self.command, url.path))
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        for pattern, handler in routes:
            match = re.fullmatch(pattern, url.path)
            if match:
                with self.hub.lock:
                    return handler(self, query=query, **match.groupdict())
        self._body()
        return self._unknown()

    def do_GET(self):
        self._dispatch(_GET_ROUTES)

    def do_HEAD(self):
        self._dispatch(_HEAD_ROUTES)

    def do_POST(self):
        self._dispatch(_POST_ROUTES)

    # -- API -----------------------------------------------------------------------------------------

    def whoami(self, query):
        if self._authorized():
            self._send(200, {"type": "user", "name": USER, "orgs": [],
                             "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}}})

    def agent_harnesses(self, query):  # huggingface_hub >= 2.x fetches this registry for its user agent
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def create(self, query):
        payload = json.loads(self._body() or b"{}")
        if not self._authorized():
            return
        self.hub.create_payloads.append(payload)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if payload.get("type") not in (None, "model"):
            return self._error(400, "the fake hub only has model repos")
        url = f"{self.hub.endpoint}/{repo_id}"
        if repo_id in self.hub.repos:
            message = "You already created this model repo"  # the Hub's 409 names the repo's url too
            return self._send(409, {"error": message, "url": url}, {"X-Error-Message": message})
        self.hub.create_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def branch(self, query, repo, branch):
        payload = json.loads(self._body() or b"{}")
        if not self._authorized() or (found := self._repo(repo)) is None:
            return
        branch = unquote(branch)
        if branch in found.branches:
            return self._error(409, f"Reference already exists: refs/heads/{branch}")
        start = found.resolve(payload.get("startingPoint") or "main")
        if start is None:
            return self._error(404, "Invalid starting point", "RevisionNotFound")
        found.branches[branch] = start
        self._send(200, {})

    def validate_yaml(self, query):
        self._body()
        self._send(200, {"errors": [], "warnings": []})

    def preupload(self, query, repo, revision):
        payload = json.loads(self._body() or b"{}")
        if not self._authorized() or (found := self._repo(repo)) is None or self._revision(found, revision) is None:
            return
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload["files"]]
        self._send(200, {"files": files, "commitOid": found.resolve(unquote(revision))})

    def commit(self, query, repo, revision):
        body = self._body()
        if not self._authorized() or (found := self._repo(repo)) is None:
            return
        parent = self._revision(found, revision)
        if parent is None:
            return
        files = dict(found.commits[parent])
        summary, paths = "", []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
                paths.append(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:  # lfsFile: preupload never asks for LFS
                return self._error(400, f"the fake hub does not take {key!r} operations")
        oid = hashlib.sha1(parent.encode() + body).hexdigest()
        found.commits[oid] = files
        name = unquote(revision)
        found.branches[name if name in found.branches else "main"] = oid
        self.hub.commits.append(Commit(repo, name, summary, paths, oid))
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.endpoint}/{repo}/commit/{oid}",
                         "pullRequestUrl": None})

    def model_info(self, query, repo, revision="main"):
        if (found := self._repo(repo)) is None or (sha := self._revision(found, revision)) is None:
            return
        files = found.commits[sha]
        self._send(200, {"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha,
                         "private": found.private, "disabled": False, "gated": False, "tags": [],
                         "siblings": [{"rfilename": path} for path in sorted(files)]})

    def tree(self, query, repo, revision, path=None):
        if (found := self._repo(repo)) is None or (sha := self._revision(found, revision)) is None:
            return
        prefix = unquote(path).strip("/") + "/" if path else ""
        recursive = str(query.get("recursive", "")).lower() in ("1", "true")
        entries, folders = [], set()
        for name, content in sorted(found.commits[sha].items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": name, "size": len(content), "oid": git_blob_oid(content)})
        entries += [{"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest()}
                    for folder in sorted(folders)]
        if path and not entries:
            return self._error(404, f"{prefix} not found", "EntryNotFound")
        self._send(200, entries)

    def resolve(self, query, repo, revision, path):
        if (found := self._repo(repo)) is None or (sha := self._revision(found, revision)) is None:
            return
        content = found.commits[sha].get(unquote(path))
        if content is None:
            return self._error(404, "Entry not found", "EntryNotFound")
        headers = {"ETag": f'"{git_blob_oid(content)}"', "X-Repo-Commit": sha,
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and self.command == "GET":
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            return self._send(206, headers=headers, body=content[start:])
        self._send(200, headers=headers, body=content)


_GET_ROUTES = [
    (r"/api/whoami-v2", _Handler.whoami),
    (r"/api/agent-harnesses", _Handler.agent_harnesses),
    (rf"/api/models/{_REPO}", _Handler.model_info),
    (rf"/api/models/{_REPO}/revision/(?P<revision>[^/]+)", _Handler.model_info),
    (rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?", _Handler.tree),
    (rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve),
]
_HEAD_ROUTES = [(rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve)]
_POST_ROUTES = [
    (r"/api/repos/create", _Handler.create),
    (r"/api/validate-yaml", _Handler.validate_yaml),
    (rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", _Handler.preupload),
    (rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", _Handler.commit),
    (rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", _Handler.branch),
]


if __name__ == "__main__":  # python tests/hub_server.py: serve until Ctrl-C, for trying things by hand
    with FakeHub() as hub:
        print(f"HF_ENDPOINT={hub.endpoint}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
