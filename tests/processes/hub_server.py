"""A minimal fake Hugging Face Hub server for tests (standard library only).

It speaks just enough of the Hub's HTTP API for the real `huggingface_hub` (2.4) and `transformers` clients to
create repos, commit files (`create_commit`, `upload_file`, `upload_folder`, `push_to_hub`) and download them again
(`hf_hub_download`, `snapshot_download`, `from_pretrained`), with git-like history: every commit gets a fresh
40-hex sha, branches point at commits, and old commits stay downloadable by sha.

    with HubServer() as server:
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_TOKEN": "hf_fake", "HF_HUB_DISABLE_XET": "1", ...}
        subprocess.run([...], env=env)  # the client must import huggingface_hub AFTER HF_ENDPOINT is set
        server.commits("org/name")      # shas, newest first
        server.files("org/name", sha)   # {path: bytes} at that revision

Every file travels "regular" (base64 inside the NDJSON commit), never through LFS or Xet: the preupload endpoint
answers `"uploadMode": "regular"` for every file, and `HF_HUB_DISABLE_XET=1` on the client keeps `upload_folder`
on its plain single-commit path and keeps downloads off Xet. Tokens are accepted but never checked.
"""

import base64
import hashlib
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


USER = "fake-user"  # whoami name, and the namespace of repos created without an organization
PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """Git's blob id: what the Hub reports as a regular file's `oid`/ETag, and what the client compares it with."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    files: dict[str, bytes]  # the full tree at this commit: path -> content (unchanged blobs are shared, not copied)
    author: str = USER
    date: str = field(default_factory=now_iso)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit sha

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit sha (quoted revisions such as refs%2Fpr%2F1 arrive unquoted)."""
        sha = self.refs.get(revision, revision)
        return self.commits.get(sha)


class HubError(Exception):
    """An error answer. `code` goes in `X-Error-Code`, which `hf_raise_for_status` maps to the client's exceptions:
    RepoNotFound -> RepositoryNotFoundError, RevisionNotFound -> RevisionNotFoundError, EntryNotFound ->
    RemoteEntryNotFoundError (which `from_pretrained` treats as "optional file absent")."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    """The fake Hub: in-memory repos served on a free port by a background thread while the `with` block runs."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.unhandled: list[tuple[str, str]] = []  # requests no route matched: a client feature this fake lacks
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self._thread = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    # ---- test-side helpers ----
    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Commit shas reachable from `revision`, newest first (like `git log --format=%H`)."""
        repo = self._repo(repo_type, repo_id)
        commit, shas = self._commit(repo, revision), []
        while commit is not None:
            shas.append(commit.sha)
            commit = repo.commits.get(commit.parent)
        return shas

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        return dict(self._commit(self._repo(repo_type, repo_id), revision).files)

    # ---- storage ----
    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _new_commit(self, repo: Repo, branch: str, files: dict, title: str, message: str = "", author=USER) -> Commit:
        parent = repo.refs.get(branch)
        # Git-like: the id hashes the tree, the parent and the message (plus a counter, so identical commits differ).
        tree = "".join(f"{path}\0{git_blob_oid(data)}\n" for path, data in sorted(files.items()))
        sha = hashlib.sha1(f"{tree}{parent}{title}{message}{next(self._counter)}".encode()).hexdigest()
        repo.commits[sha] = Commit(sha, parent, title, message, files, author)
        repo.refs[branch] = sha
        return repo.commits[sha]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer therefore carries Content-Length

    def log_message(self, *args):  # keep pytest output quiet
        pass

    # ---- plumbing ----
    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))  # on HEAD: the size the GET would return
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return True  # "handled", for _route

    def _json(self, payload, status: int = 200, headers: dict | None = None):
        return self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self):
        url = urlsplit(self.path)
        self.hub.requests.append((self.command, url.path))
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._body() if self.command in ("POST", "PUT") else b""
        # Split before unquoting: the client quotes revisions with safe="", so "refs%2Fpr%2F1" stays one segment.
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        try:
            with self.hub._lock:
                if not self._route(parts, body):
                    self.hub.unhandled.append((self.command, url.path))
                    self._json({"error": f"fake hub: no route for {self.command} {url.path}"}, 404)
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json({"error": e.message}, e.status, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ---- routing ----
    def _route(self, parts: list[str], body: bytes) -> bool:
        method = self.command
        if parts[0] == "api":
            if parts[1:] == ["whoami-v2"]:  # whoami(); called by some push helpers to find the namespace
                whoami = {"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}}
                return self._json(whoami)
            if parts[1:] == ["validate-yaml"] and method == "POST":  # create_commit checks a README.md's metadata
                return self._json({"errors": [], "warnings": []})
            if parts[1:] == ["repos", "create"] and method == "POST":
                return self._create_repo(json.loads(body or b"{}"))
            if len(parts) >= 4 and parts[1] in PLURAL:
                repo = self.hub._repo(PLURAL[parts[1]], f"{parts[2]}/{parts[3]}")
                action, rest = (parts[4], parts[5:]) if len(parts) > 4 else (None, [])
                if action is None and method == "GET":  # repo_info()/model_info() at main
                    return self._repo_info(repo, "main")
                if action == "revision" and method == "GET":  # repo_info(revision=...): resolves a branch to a sha
                    return self._repo_info(repo, rest[0])
                if action == "tree" and method == "GET":  # list_repo_tree / list_repo_files; snapshot_download
                    return self._tree(repo, rest[0], "/".join(rest[1:]))
                if action == "paths-info" and method == "POST":  # get_paths_info (form-encoded body)
                    return self._paths_info(repo, rest[0], parse_qs(body.decode()).get("paths", []))
                if action == "preupload" and method == "POST":
                    return self._preupload(repo, rest[0], json.loads(body))
                if action == "commit" and method == "POST":
                    return self._create_commit(repo, rest[0], body)
                if action == "branch" and method == "POST":  # create_branch (push_to_hub(revision=...))
                    return self._create_branch(repo, rest[0], json.loads(body or b"{}"))
                if action == "commits" and method == "GET":  # list_repo_commits
                    return self._list_commits(repo, rest[0])
            return False
        # File downloads: /{prefix}{namespace}/{name}/resolve/{revision}/{path...}
        repo_type = PLURAL.get(parts[0], "model") if parts[0] in ("datasets", "spaces", "kernels") else "model"
        parts = parts[1:] if repo_type != "model" else parts
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(self.hub._repo(repo_type, f"{parts[0]}/{parts[1]}"), parts[3], "/".join(parts[4:]))
        return False

    # ---- endpoints ----
    def _create_repo(self, payload: dict):
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            # create_repo(exist_ok=True) swallows the 409 and then still reads `url` from this body.
            return self._json({"error": "You already created this repo", "url": url}, 409)
        repo = self.hub.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id)
        # Like the Hub: a new repo already has one commit, by "system", holding .gitattributes.
        self.hub._new_commit(repo, "main", {".gitattributes": GITATTRIBUTES}, "initial commit", author="system")
        return self._json({"url": url, "name": repo_id})

    def _repo_info(self, repo: Repo, revision: str):
        commit = self.hub._commit(repo, revision)
        return self._json({
            "id": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "sha": commit.sha, "lastModified": commit.date, "private": False, "disabled": False, "gated": False,
            "tags": [], "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        })

    def _entry(self, path: str, files: dict) -> dict:
        if path in files:
            return {"type": "file", "path": path, "size": len(files[path]), "oid": git_blob_oid(files[path])}
        return {"type": "directory", "path": path, "size": 0, "oid": hashlib.sha1(path.encode()).hexdigest()}

    def _tree(self, repo: Repo, revision: str, root: str):
        files = self.hub._commit(repo, revision).files
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        prefix = root.strip("/") + "/" if root.strip("/") else ""
        paths = set()
        for path in files:
            if not path.startswith(prefix):
                continue
            pieces = path[len(prefix):].split("/")
            # Every folder between the root and the file is listed too, as the Hub does.
            for depth in range(1, len(pieces) + 1 if recursive else 2):
                paths.add(prefix + "/".join(pieces[:depth]))
        if prefix and not paths:
            raise HubError(404, f"{root} does not exist on {revision}", "EntryNotFound")
        return self._json([self._entry(path, files) for path in sorted(paths)])

    def _paths_info(self, repo: Repo, revision: str, paths: list[str]):
        files = self.hub._commit(repo, revision).files
        found = [p for p in paths if p in files or any(f.startswith(p.rstrip("/") + "/") for f in files)]
        return self._json([self._entry(path, files) for path in found])  # missing paths are simply left out

    def _preupload(self, repo: Repo, revision: str, payload: dict):
        # Every file "regular": its bytes then ride base64 in the commit, so no LFS batch / Xet protocol is needed.
        # `oid` is the current blob id (None if absent): the client drops files whose content did not change.
        files = self.hub._commit(repo, revision).files
        return self._json({"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None}
            for f in payload["files"]
        ]})

    def _create_commit(self, repo: Repo, branch: str, body: bytes):
        if self.query.get("create_pr"):
            raise HubError(400, "fake hub: pull requests are not supported")
        if branch not in repo.refs:
            raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
        files = dict(repo.commits[repo.refs[branch]].files)
        header = {}
        for line in filter(None, body.splitlines()):  # NDJSON: one {"key": ..., "value": ...} per line
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                content = value["content"]
                base64_encoded = value.get("encoding") == "base64"
                files[value["path"]] = base64.b64decode(content) if base64_encoded else content.encode()
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            else:  # "lfsFile" would need an LFS upload first; preupload never asks for one
                raise HubError(400, f"fake hub: unsupported commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent is not None and parent != repo.refs[branch]:  # optimistic concurrency, like the Hub
            raise HubError(412, f"A commit has happened since. Parent {parent} is not the head of {branch}")
        commit = self.hub._new_commit(repo, branch, files, header.get("summary", ""), header.get("description", ""))
        url = f"{self.hub.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.sha}"
        return self._json({"success": True, "commitOid": commit.sha, "commitUrl": url, "hookOutput": ""})

    def _create_branch(self, repo: Repo, branch: str, payload: dict):
        if branch in repo.refs:
            return self._json({"error": f"Reference {branch} already exists"}, 409)  # exist_ok=True swallows it
        repo.refs[branch] = self.hub._commit(repo, payload.get("startingPoint") or "main").sha
        return self._json({})

    def _list_commits(self, repo: Repo, revision: str):
        self.hub._commit(repo, revision)  # 404 RevisionNotFound if unknown
        return self._json([
            {"id": c.sha, "title": c.title, "message": c.message, "authors": [{"user": c.author}], "date": c.date}
            for c in (repo.commits[sha] for sha in self.hub.commits(repo.repo_id, revision, repo.repo_type))
        ])

    def _resolve(self, repo: Repo, revision: str, path: str):
        commit = self.hub._commit(repo, revision)
        # X-Repo-Commit: the client refuses any answer without it, files its download under that sha, and on a 404
        # uses it to cache "this file is absent at this commit". ETag: the blob id, the cache's key for the content.
        headers = {"X-Repo-Commit": commit.sha}
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        data = commit.files[path]
        headers.update({"ETag": f'"{git_blob_oid(data)}"', "Accept-Ranges": "bytes"})
        # No redirect (the Hub sends LFS files to a CDN): we answer 200 with the bytes, so the HEAD's Content-Length
        # is the size; X-Linked-Size / X-Linked-Etag (the LFS file's size and sha256) are therefore not needed.
        status, range_ = 200, self.headers.get("Range", "")
        if range_.startswith("bytes="):  # a resumed download of a partly fetched file
            start, _, end = range_[6:].partition("-")
            start, end = int(start or 0), int(end) if end else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        return self._send(status, data, headers, "application/octet-stream")
