"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for offline push/download tests.

It implements the part of the Hub API that `huggingface_hub` 2.x uses to create repositories, commit files
(`upload_folder`, `upload_file`, `push_to_hub`) and read them back (`hf_hub_download`, `snapshot_download`,
`model_info`, `list_repo_tree`, `ModelCard.load`):

| request | route |
|---|---|
| who am I | `GET /api/whoami-v2` |
| create a repo | `POST /api/repos/create` |
| check README metadata | `POST /api/validate-yaml` |
| upload modes | `POST /api/{type}s/{repo}/preupload/{rev}` (every file is "regular": inline base64 in the commit) |
| commit | `POST /api/{type}s/{repo}/commit/{rev}` (NDJSON: header, file, deletedFile, deletedFolder) |
| repo info | `GET /api/{type}s/{repo}` and `GET /api/{type}s/{repo}/revision/{rev}` (sha + siblings) |
| file listing | `GET /api/{type}s/{repo}/tree/{rev}[/{path}]` |
| file download | `HEAD`/`GET /[{type}s/]{repo}/resolve/{rev}/{path}` (ETag, X-Repo-Commit, Content-Length, ranges) |

Every commit is kept (downloads by commit hash work); file contents live as git blobs (`sha1("blob <n>\\0" +
data)`, the Hub's ETag for non-LFS files) in a temporary directory. Errors carry the `X-Error-Code` headers that
`huggingface_hub` maps to `RepositoryNotFoundError`, `RevisionNotFoundError` and `EntryNotFoundError`. Writes need
an `Authorization: Bearer <anything>` header. The server listens on loopback only, on a free port, in a daemon
thread; every request is read with a size bound and answered once.

Usage (clients read `HF_ENDPOINT` at import time, so point a *fresh* process at `hub.endpoint`):

    with FakeHub() as hub:
        env = {**os.environ, **hub.client_env(hf_home)}
        subprocess.run([sys.executable, "script.py"], env=env, check=True)
        assert "model_index.json" in hub.files("fake-user/my-pipeline")
"""

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


DEFAULT_USER = "fake-user"
MAX_BODY_BYTES = 512 * 1024 * 1024  # refuse larger request bodies instead of reading them
REPO_TYPES = ("model", "dataset", "space")
INITIAL_FILES = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}


class HubError(Exception):
    """An HTTP error answer: status, message and the `X-Error-Code` huggingface_hub dispatches on."""

    def __init__(self, status: int, message: str, error_code: Optional[str] = None, extra: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra or {}


def git_blob_oid(data: bytes) -> str:
    """The git blob id of `data`, which the Hub serves as ETag and tree `oid` for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.repo_type, self.repo_id, self.private = repo_type, repo_id, private
        self.created_at = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        self.commits: Dict[str, dict] = {}  # oid -> {"parent", "message", "files": {path: (blob, size)}, "date"}
        self.refs: Dict[str, str] = {}

    def head(self, revision: str) -> Tuple[str, dict]:
        revision = unquote(revision)
        oid = self.refs.get(revision) or (revision if revision in self.commits else None)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid, self.commits[oid]


class FakeHub:
    """A loopback Hub for tests. `start()` (or `with FakeHub() as hub`) serves it; `stop()` ends it."""

    def __init__(self, user: str = DEFAULT_USER, root: Optional[str] = None):
        self.user = user
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="fake-hub-")
        os.makedirs(os.path.join(self.root, "blobs"), exist_ok=True)
        self._repos: Dict[Tuple[str, str], _Repo] = {}
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.requests: List[Tuple[str, str]] = []  # (method, path) of every request, for assertions

    # -- lifecycle ------------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake hub is not running; call start() first")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        handler = type("FakeHubHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = self._thread = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, hf_home: str, token: str = "hf_fake_token") -> Dict[str, str]:
        """Environment variables that point a new process's huggingface_hub / diffusers at this server."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_TOKEN": token,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",  # no Xet storage here: files go inline through the commit endpoint
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HOME": hf_home,
            "HF_HUB_CACHE": os.path.join(hf_home, "hub"),
            "HF_MODULES_CACHE": os.path.join(hf_home, "modules"),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    # -- inspection (for tests) ----------------------------------------------------------------------------------

    def repo_ids(self, repo_type: str = "model") -> List[str]:
        with self._lock:
            return sorted(repo_id for kind, repo_id in self._repos if kind == repo_type)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> List[str]:
        with self._lock:
            return sorted(self._repo(repo_type, repo_id).head(revision)[1]["files"])

    def read(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self._lock:
            files = self._repo(repo_type, repo_id).head(revision)[1]["files"]
            if path not in files:
                raise KeyError(f"{path} is not in {repo_id}@{revision}")
            return self._blob(files[path][0])

    def commit_messages(self, repo_id: str, repo_type: str = "model") -> List[str]:
        """Commit summaries from the first to the latest commit on `main`."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            oid, messages = repo.refs["main"], []
            while oid is not None:
                messages.append(repo.commits[oid]["message"])
                oid = repo.commits[oid]["parent"]
            return messages[::-1]

    # -- storage --------------------------------------------------------------------------------------------------

    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _store_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        path = os.path.join(self.root, "blobs", oid)
        if not os.path.exists(path):
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
        return oid

    def _blob(self, oid: str) -> bytes:
        with open(os.path.join(self.root, "blobs", oid), "rb") as f:
            return f.read()

    def _new_commit(self, repo: _Repo, parent: Optional[str], message: str, files: dict) -> str:
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        record = json.dumps([parent, message, sorted(files.items()), date, len(repo.commits)]).encode()
        oid = hashlib.sha1(record).hexdigest()
        repo.commits[oid] = {"parent": parent, "message": message, "files": dict(files), "date": date}
        repo.refs["main"] = oid
        return oid

    # -- API operations (called with the lock held) ------------------------------------------------------------

    def create_repo(self, body: dict) -> dict:
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"unknown repo type {repo_type!r}")
        name = body.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.\-]{1,96}", name):
            raise HubError(400, f"invalid repo name {name!r}")
        repo_id = f"{body.get('organization') or self.user}/{name}"
        key = (repo_type, repo_id)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.endpoint}/{prefix}{repo_id}"
        if key in self._repos:  # the Hub names the existing repo, which `create_repo(exist_ok=True)` returns
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        repo = self._repos[key] = _Repo(repo_type, repo_id, bool(body.get("private")))
        files = {path: (self._store_blob(data), len(data)) for path, data in INITIAL_FILES.items()}
        self._new_commit(repo, None, "initial commit", files)
        return {"url": url, "name": repo_id, "id": repo_id}

    def preupload(self, repo: _Repo, revision: str, body: dict) -> dict:
        files = repo.head(revision)[1]["files"]
        answers = []
        for entry in body.get("files", []):
            existing = files.get(entry["path"])
            answers.append(
                {
                    "path": entry["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": existing[0] if existing else None,  # unchanged files are skipped by the client
                }
            )
        return {"files": answers}

    def commit(self, repo: _Repo, revision: str, body: bytes, query: dict) -> dict:
        if query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by the fake hub")
        parent, head = repo.head(revision)
        files = dict(head["files"])
        lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "a commit starts with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != parent:
            raise HubError(412, f"parent commit {header['parentCommit']} is not the head of {revision} ({parent})")
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key in ("file", "lfsFile", "deletedFile") and (
                not path or path.startswith("/") or ".." in path.split("/")
            ):
                raise HubError(400, f"invalid path in repo {path!r}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "file contents must be base64-encoded")
                data = base64.b64decode(value["content"])
                files[path] = (self._store_blob(data), len(data))
            elif key == "lfsFile":
                raise HubError(400, "LFS uploads are not supported by the fake hub (preupload answers 'regular')")
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for name in [p for p in files if p.startswith(prefix)]:
                    del files[name]
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        oid = self._new_commit(repo, parent, header.get("summary") or "", files)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return {
            "commitUrl": f"{self.endpoint}/{prefix}{repo.repo_id}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": None,
        }

    def repo_info(self, repo: _Repo, revision: str, query: dict) -> dict:
        oid, commit = repo.head(revision)
        with_blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for path, (blob, size) in sorted(commit["files"].items()):
            sibling = {"rfilename": path}
            if with_blobs:
                sibling.update(size=size, blobId=blob)
            siblings.append(sibling)
        card = {}
        if "README.md" in commit["files"]:
            card = _front_matter(self._blob(commit["files"]["README.md"][0]).decode("utf-8", "replace")) or {}
        namespace = repo.repo_id.split("/")[0]
        info = {
            "_id": oid[:24],
            "id": repo.repo_id,
            "author": namespace,
            "sha": oid,
            "lastModified": commit["date"],
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card.get("tags") or []),
            "siblings": siblings,
        }
        if repo.repo_type == "model":
            info.update(
                modelId=repo.repo_id, library_name=card.get("library_name"), pipeline_tag=card.get("pipeline_tag")
            )
        if card:
            info["cardData"] = card
        return info

    def tree(self, repo: _Repo, revision: str, path: str, query: dict) -> list:
        files = repo.head(revision)[1]["files"]
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        entries, folders = [], set()
        for name, (blob, size) in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :].split("/")
            for depth in range(1, len(rest)):  # the folders between `path` and the file
                if depth > 1 and not recursive:
                    break
                folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                entries.append({"type": "file", "oid": blob, "size": size, "path": name})
        for folder in sorted(folders):
            entries.append(
                {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder}
            )
        return entries

    def resolve(self, repo: _Repo, revision: str, path: str) -> Tuple[str, str, bytes]:
        oid, commit = repo.head(revision)
        if path not in commit["files"]:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        blob = commit["files"][path][0]
        return oid, blob, self._blob(blob)


def _front_matter(text: str) -> Optional[dict]:
    """The YAML metadata block of a README, `None` when there is none; raises `ValueError` if it is not YAML."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.S)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        raise ValueError(f"invalid YAML metadata: {e}") from e
    if data is not None and not isinstance(data, dict):
        raise ValueError("the YAML metadata must be a mapping")
    return data or {}


_API_REPO = re.compile(
    r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(preupload|commit|revision|tree)/([^/]+)(/.*)?)?$"
)
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the per-server subclass
    server_version = "FakeHub/1.0"

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise HubError(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HubError(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload) -> None:
        self._send(status, json.dumps(payload).encode())

    def _require_token(self) -> None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[len("Bearer ") :].strip():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        with self.hub._lock:
            self.hub.requests.append((self.command, path))
        try:
            body = self._body() if self.command in ("POST", "PUT") else b""
            with self.hub._lock:
                self._route(path, query, body)
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.error_code:
                headers["X-Error-Code"] = e.error_code
            self._send(e.status, json.dumps({"error": e.message, **e.extra}).encode(), headers)
        except Exception as e:  # a bug here must answer, or the client waits for its timeout
            self._send(500, json.dumps({"error": f"fake hub error: {type(e).__name__}: {e}"}).encode())

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- routes (lock held) ---------------------------------------------------------------------------------------

    def _route(self, path: str, query: dict, body: bytes) -> None:
        hub, method = self.hub, self.command
        if path == "/api/whoami-v2" and method == "GET":
            self._require_token()
            return self._json(200, {"type": "user", "name": hub.user, "fullname": hub.user, "orgs": [], "auth": {}})
        if path == "/api/repos/create" and method == "POST":
            self._require_token()
            return self._json(200, hub.create_repo(json.loads(body or b"{}")))
        if path == "/api/validate-yaml" and method == "POST":
            try:
                _front_matter(json.loads(body).get("content", ""))
            except ValueError as e:
                return self._json(400, {"errors": [{"message": str(e)}], "warnings": []})
            return self._json(200, {"errors": [], "warnings": []})

        match = _API_REPO.match(path)
        if match:
            kind, repo_id, action, revision, rest = match.groups()
            repo = hub._repo(kind[:-1], unquote(repo_id))
            if action == "preupload" and method == "POST":
                self._require_token()
                return self._json(200, hub.preupload(repo, revision, json.loads(body or b"{}")))
            if action == "commit" and method == "POST":
                self._require_token()
                return self._json(200, hub.commit(repo, revision, body, query))
            if action is None and method == "GET":
                return self._json(200, hub.repo_info(repo, "main", query))
            if action == "revision" and method == "GET" and not rest:
                return self._json(200, hub.repo_info(repo, revision, query))
            if action == "tree" and method == "GET":
                return self._json(200, hub.tree(repo, revision, unquote(rest or ""), query))

        match = _RESOLVE.match(path)
        if match and method in ("GET", "HEAD"):
            kind, repo_id, revision, file_path = match.groups()
            repo = hub._repo((kind or "models")[:-1], unquote(repo_id))
            commit, blob, data = hub.resolve(repo, revision, unquote(file_path))
            headers = {"ETag": f'"{blob}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
            status, start, end = 200, 0, len(data)
            ranges = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranges and data:
                start = min(int(ranges.group(1)), len(data))
                end = min(int(ranges.group(2)) + 1, len(data)) if ranges.group(2) else len(data)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            return self._send(status, data[start:end], headers, content_type="application/octet-stream")

        raise HubError(404, f"{method} {path} is not implemented by the fake hub")
