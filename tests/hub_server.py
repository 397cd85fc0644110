"""An in-memory Hugging Face Hub for tests: the subset of the Hub HTTP API that huggingface_hub's own
`HfApi` (create_repo, create_commit, model_info, list_repo_tree, get_paths_info, list_repo_commits) and
`HfFileSystem` (ls, find, info, open with ranged reads, cat) use on model repos, standard library only.

Uploads are always "regular" (base64 inside the commit's NDJSON payload, never LFS or Xet). A commit whose
`parentCommit` is not the head of its branch is refused with HTTP 412, as on the Hub.

    with HubServer() as hub:
        hub.create_repo("org/name")
        api = HfApi(endpoint=hub.url, token=False)
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import sys
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

DEFAULT_BRANCH = "main"
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_CONFLICT_MESSAGE = "A commit has happened since. Please refresh and try again."


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of `data`: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    """The current UTC time in the Hub's format, e.g. 2024-01-02T03:04:05.678Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Commit:
    """One commit of a repo: its sha, parent sha, message and the full snapshot of the repo's files."""

    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, bytes]


@dataclass
class _Repo:
    """A model repo: its commits (oldest first), indexed by sha, and its branches."""

    created_at: str
    commits: list[Commit] = field(default_factory=list)
    by_sha: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


class HubError(Exception):
    """An error answered as the Hub does: a status, a JSON {"error": ...} body and maybe an X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, **body: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


def _not_found(code: str, message: str) -> HubError:
    return HubError(404, message, code)


def _entry(files: dict[str, bytes], path: str) -> dict[str, Any] | None:
    """The tree entry of `path` (a file, or a directory implied by the file paths below it), or None."""
    if path in files:
        data = files[path]
        return {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
    prefix = path + "/"
    below = sorted((p, git_blob_oid(d)) for p, d in files.items() if p.startswith(prefix))
    if not below:
        return None
    oid = hashlib.sha1("".join(f"{p}\0{o}\n" for p, o in below).encode()).hexdigest()
    return {"type": "directory", "path": path, "size": 0, "oid": oid}


def _state(files: dict[str, bytes], path: str) -> tuple[tuple[str, bytes], ...]:
    """What a commit holds at `path` (the file, or every file below the directory), to find its last change."""
    prefix = path + "/"
    return tuple(sorted((p, d) for p, d in files.items() if p == path or p.startswith(prefix)))


def _validate_path(path: str) -> str:
    """A repo path as the Hub accepts it: relative, no empty, '.' or '..' segment."""
    if not path or path.startswith("/") or any(s in ("", ".", "..") for s in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class HubServer:
    """A fake Hugging Face Hub serving in-memory model repos on `url` (http://127.0.0.1:PORT).

    `page_size` caps the entries of one tree page (the Hub uses 1000, and 50 with expand=true).
    Every request's (method, path) is appended to `requests`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, page_size: int = 1000) -> None:
        self.page_size = page_size
        self.requests: list[tuple[str, str]] = []
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._connections: set[socket.socket] = set()
        self._httpd = _HTTPServer((host, port), _Handler, self)
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the kept-alive client connections and release the port."""
        self._httpd.shutdown()
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- direct access for tests ----------------------------------------------------------------

    def create_repo(self, repo_id: str) -> str:
        """Create the model repo `org/name` with one empty initial commit on `main`; return that commit's sha."""
        with self._lock:
            return self._create_repo(repo_id)

    def commits(self, repo_id: str) -> list[Commit]:
        """Every commit of the repo, oldest first (the initial empty commit included)."""
        with self._lock:
            return list(self._repo(repo_id).commits)

    def head(self, repo_id: str, branch: str = DEFAULT_BRANCH) -> str:
        """The sha of the commit `branch` points at."""
        with self._lock:
            return self._commit(repo_id, branch).sha

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> dict[str, bytes]:
        """The files of the repo at `revision` (a branch or a commit sha)."""
        with self._lock:
            return dict(self._commit(repo_id, revision).files)

    # ---- state (callers hold self._lock) --------------------------------------------------------

    def _create_repo(self, repo_id: str) -> str:
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'org/name'")
        if repo_id in self._repos:  # the Hub's 409 carries the url: create_repo(exist_ok=True) returns it
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        now = _now()
        self._repos[repo_id] = _Repo(created_at=now)
        return self._add_commit(repo_id, DEFAULT_BRANCH, None, "initial commit", "", {}, now).sha

    def _repo(self, repo_id: str) -> _Repo:
        if repo_id not in self._repos:
            raise _not_found("RepoNotFound", "Repository not found")
        return self._repos[repo_id]

    def _commit(self, repo_id: str, revision: str) -> Commit:
        repo = self._repo(repo_id)
        sha = repo.branches.get(revision, revision)
        if sha not in repo.by_sha:
            raise _not_found("RevisionNotFound", f"Invalid rev id: {revision}")
        return repo.by_sha[sha]

    def _add_commit(self, repo_id: str, branch: str, parent: str | None, title: str, message: str,
                    files: dict[str, bytes], date: str) -> Commit:
        """Record a new commit on `branch` (whose head must be `parent`)."""
        repo = self._repos[repo_id]
        seed = f"{repo_id}\0{parent}\0{title}\0{message}\0{date}\0{next(self._counter)}\0"
        seed += "".join(f"{p}\0{git_blob_oid(d)}\n" for p, d in sorted(files.items()))
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, date, files)
        repo.commits.append(commit)
        repo.by_sha[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def _last_commit(self, repo_id: str, commit: Commit, path: str) -> dict[str, str]:
        """The Hub's `lastCommit` of `path`: the newest ancestor-or-self commit that changed it."""
        by_sha = self._repos[repo_id].by_sha
        state = _state(commit.files, path)
        while commit.parent is not None and _state(by_sha[commit.parent].files, path) == state:
            commit = by_sha[commit.parent]
        return {"id": commit.sha, "title": commit.title, "date": commit.date}

    # ---- HTTP endpoints -------------------------------------------------------------------------

    def route(self, method: str, raw_path: str, query: dict[str, list[str]], body: bytes,
              headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """Answer one request: (status, headers, body). HubError becomes a Hub-like JSON error."""
        segs = [unquote(s) for s in raw_path.split("/")[1:]]
        with self._lock:
            self.requests.append((method, raw_path))
            if segs[:2] == ["api", "repos"] and segs[2:] == ["create"] and method == "POST":
                return self._api_create_repo(json.loads(body or b"{}"))
            if segs[:2] == ["api", "validate-yaml"] and len(segs) == 2 and method == "POST":
                return _json({"errors": [], "warnings": []})
            if segs[:2] == ["api", "models"] and len(segs) >= 4:
                repo_id, action, rest = "/".join(segs[2:4]), segs[4:5], segs[5:]
                if method == "GET" and not action:
                    return self._model_info(repo_id, DEFAULT_BRANCH, query)
                if method == "GET" and action == ["revision"] and len(rest) == 1:
                    return self._model_info(repo_id, rest[0], query)
                if method == "POST" and action == ["preupload"] and len(rest) == 1:
                    return self._preupload(repo_id, rest[0], json.loads(body))
                if method == "POST" and action == ["commit"] and len(rest) == 1:
                    return self._create_commit(repo_id, rest[0], body, query)
                if method == "GET" and action == ["tree"] and rest:
                    return self._tree(repo_id, rest[0], "/".join(rest[1:]), raw_path, query)
                if method == "POST" and action == ["paths-info"] and len(rest) == 1:
                    return self._paths_info(repo_id, rest[0], body, headers.get("content-type", ""))
                if method == "GET" and action == ["commits"] and len(rest) == 1:
                    return self._list_commits(repo_id, rest[0])
            if method in ("GET", "HEAD") and len(segs) >= 5 and segs[2] == "resolve" and segs[0] != "api":
                return self._resolve(f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), headers.get("range"))
        raise HubError(404, f"Not found: {method} {raw_path}")

    def _api_create_repo(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if payload.get("type", "model") != "model":
            raise HubError(400, "Only model repos are supported by this test server")
        repo_id = f"{payload.get('organization') or 'user'}/{payload.get('name')}"
        self._create_repo(repo_id)
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _model_info(self, repo_id: str, revision: str, query: dict[str, list[str]]
                    ) -> tuple[int, dict[str, str], bytes]:
        repo, commit = self._repo(repo_id), self._commit(repo_id, revision)
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [{"rfilename": p, **({"size": len(d), "blobId": git_blob_oid(d)} if blobs else {})}
                    for p, d in sorted(commit.files.items())]
        return _json({"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                      "author": repo_id.split("/")[0], "sha": commit.sha, "lastModified": commit.date,
                      "createdAt": repo.created_at, "private": False, "gated": False, "disabled": False,
                      "downloads": 0, "likes": 0, "tags": [], "siblings": siblings})

    def _preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        commit, out = self._commit(repo_id, revision), []
        for f in payload.get("files", []):
            entry: dict[str, Any] = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
            if f["path"] in commit.files:  # lets the client drop unchanged files from the commit, as on the Hub
                entry["oid"] = git_blob_oid(commit.files[f["path"]])
            out.append(entry)
        return _json({"files": out, "commitOid": commit.sha})

    def _create_commit(self, repo_id: str, revision: str, body: bytes, query: dict[str, list[str]]
                       ) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        if query.get("create_pr", ["0"])[0] not in ("0", "false", ""):
            raise HubError(400, "Pull requests are not supported by this test server")
        if revision not in repo.branches:
            raise _not_found("RevisionNotFound", f"Invalid rev id: {revision} (commits go to a branch)")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of the commit payload must be its header")
        header = lines[0]["value"]
        head = repo.branches[revision]
        parent = header.get("parentCommit")
        if parent is not None and not (len(parent) >= 5 and head.startswith(parent.lower())):
            raise HubError(412, _CONFLICT_MESSAGE)
        files = dict(repo.by_sha[head].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            path = _validate_path(path.rstrip("/") if key == "deletedFolder" else path)
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                files[path] = base64.b64decode(value["content"], validate=True)
            elif key == "deletedFile":
                if path not in files:
                    raise _not_found("EntryNotFound", f"A file with this name doesn't exist: {path}")
                del files[path]
            elif key == "deletedFolder":
                below = [p for p in files if p.startswith(path + "/")]
                if not below:
                    raise _not_found("EntryNotFound", f"A folder with this name doesn't exist: {path}")
                for p in below:
                    del files[p]
            elif key == "lfsFile":
                raise HubError(400, f"LFS files are not supported by this test server: {path}")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        folders = {p[:i] for p in files for i, c in enumerate(p) if c == "/"}
        if clash := sorted(folders.intersection(files)):
            raise HubError(400, f"{clash[0]} would be both a file and a folder")
        commit = self._add_commit(repo_id, revision, head, header.get("summary", ""),
                                  header.get("description", ""), files, _now())
        return _json({"success": True, "commitOid": commit.sha, "hookOutput": "", "pullRequestUrl": None,
                      "commitUrl": f"{self.url}/{repo_id}/commit/{commit.sha}"})

    def _tree(self, repo_id: str, revision: str, path: str, raw_path: str, query: dict[str, list[str]]
              ) -> tuple[int, dict[str, str], bytes]:
        commit = self._commit(repo_id, revision)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        expand = query.get("expand", ["false"])[0].lower() == "true"
        if path and (_entry(commit.files, path) or {}).get("type") != "directory":
            raise _not_found("EntryNotFound", f"{path} does not exist on \"{revision}\"")
        prefix = path + "/" if path else ""
        paths = set()
        for p in commit.files:
            if p.startswith(prefix):
                parts = p[len(prefix):].split("/")
                depths = range(1, len(parts) + 1) if recursive else [1]
                paths.update(prefix + "/".join(parts[:d]) for d in depths)
        names = sorted(paths)
        start = int(query.get("cursor", ["0"])[0])
        size = min(self.page_size, 50) if expand else self.page_size
        page = [self._path_info(repo_id, commit, p, expand) for p in names[start:start + size]]
        headers = {}
        if start + size < len(names):
            params = urlencode({"recursive": recursive, "expand": expand, "cursor": start + size}).lower()
            headers["Link"] = f'<{self.url}{raw_path}?{params}>; rel="next"'
        return _json(page, headers)

    def _path_info(self, repo_id: str, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        entry = _entry(commit.files, path)
        if expand:
            entry["lastCommit"] = self._last_commit(repo_id, commit, path)
        return entry

    def _paths_info(self, repo_id: str, revision: str, body: bytes, content_type: str
                    ) -> tuple[int, dict[str, str], bytes]:
        commit = self._commit(repo_id, revision)
        if content_type.startswith("application/json"):
            payload = json.loads(body)
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[0].lower() == "true"
        paths = [p.strip("/") for p in paths]
        return _json([self._path_info(repo_id, commit, p, expand) for p in paths
                      if p and _entry(commit.files, p) is not None])

    def _list_commits(self, repo_id: str, revision: str) -> tuple[int, dict[str, str], bytes]:
        commit, by_sha, out = self._commit(repo_id, revision), self._repos[repo_id].by_sha, []
        while True:
            out.append({"id": commit.sha, "title": commit.title, "message": commit.message,
                        "authors": [{"user": "user"}], "date": commit.date})
            if commit.parent is None:
                return _json(out)
            commit = by_sha[commit.parent]

    def _resolve(self, repo_id: str, revision: str, path: str, range_header: str | None
                 ) -> tuple[int, dict[str, str], bytes]:
        commit = self._commit(repo_id, revision)
        if path not in commit.files:
            raise _not_found("EntryNotFound", "Entry not found")
        data = commit.files[path]
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "ETag": f'"{git_blob_oid(data)}"', "X-Repo-Commit": commit.sha}
        m = _RANGE_RE.fullmatch((range_header or "").strip())
        if m is None or m.groups() == ("", ""):
            return 200, headers, data
        first, last = m.groups()
        if first:
            start, end = int(first), min(int(last), len(data) - 1) if last else len(data) - 1
        else:  # suffix range: the last N bytes
            start, end = max(len(data) - int(last), 0), len(data) - 1
        if start >= len(data) or start > end:
            return 416, {**headers, "Content-Range": f"bytes */{len(data)}"}, b""
        return 206, {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}, data[start:end + 1]


def _json(obj: Any, headers: dict[str, str] | None = None, status: int = 200) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its HubServer and keeps quiet about clients hanging up."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], hub: HubServer) -> None:
        self.hub = hub
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore dropped connections; report anything else."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Reads one request (HTTP/1.1, keep-alive), hands it to HubServer.route and writes the answer."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else headers and body, written apart, wait on delayed ACKs (40 ms a request)
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.hub._lock:
            self.server.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """No request logging."""

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()
        url = urlsplit(self.path)
        request_id = self.headers.get("X-Request-Id") or self.headers.get("X-Amzn-Trace-Id") or str(uuid.uuid4())
        try:
            status, headers, payload = self.server.hub.route(
                self.command, url.path, parse_qs(url.query, keep_blank_values=True), body,
                {k.lower(): v for k, v in self.headers.items()})
        except HubError as e:
            status, headers, payload = _json({"error": e.message, **e.body}, status=e.status)
            if e.code:
                headers["X-Error-Code"] = e.code
        except Exception as e:  # a bug here, or a malformed request: answer it rather than hang the client
            status, headers, payload = _json({"error": f"{type(e).__name__}: {e}"}, status=400)
        self.send_response(status)
        for k, v in {**headers, "X-Request-Id": request_id, "Content-Length": str(len(payload))}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle
