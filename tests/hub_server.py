"""A stand-in for the Hugging Face Hub on 127.0.0.1: the file API huggingface_hub 2.x downloads with.

Endpoints, as the real Hub answers them (learned from huggingface_hub's hf_api.py / file_download.py /
_snapshot_download.py and utils/_http.py's error mapping):
- GET  /api/models/{repo}[/revision/{rev}][?blobs=True]   model info: sha, gated, siblings (sizes with blobs)
- GET  /api/models/{repo}/tree/{rev}[/{path}]?recursive=   file list: type, oid, size, path, lfs
- HEAD /{repo}/resolve/{rev}/{file}    X-Repo-Commit, ETag (sha256 for LFS files, git blob sha1 else), sizes
- GET  /{repo}/resolve/{rev}/{file}    the bytes; `Range: bytes=N-` answers 206 (resumed downloads)
Errors carry X-Error-Code as the Hub's do: RepoNotFound (401 without a token, 404 with one), GatedRepo
(401 without a token, 403 with a token that has no access; metadata of a gated repo stays public),
RevisionNotFound and EntryNotFound (404). Every request is logged as (method, path, range header).
"""
import hashlib
import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx")


class Repo:
    def __init__(self, gated=False):
        self.gated = gated
        self.commits = {}  # sha -> {path: bytes}
        self.refs = {}  # branch or tag -> sha

    def commit(self, files, ref="main", counter=itertools.count()):
        digest = hashlib.sha1(str(next(counter)).encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha

    def resolve(self, rev):
        if rev in self.commits:
            return rev
        return self.refs.get(rev)


def _entry(path, data):
    """A file's tree entry: git blob oid, size, and the LFS pointer for large-file types."""
    oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    entry = {"type": "file", "oid": oid, "size": len(data), "path": path}
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


class FakeHub:
    """Serve repos from memory. `add(repo_id, files)` commits {path: bytes}; `add_folder` reads a folder."""

    def __init__(self, tokens=("hf_good",)):
        self.repos = {}
        self.tokens = set(tokens)  # tokens with access to gated repos
        self.log = []
        self.cut_once = set()  # paths whose next GET stops halfway (a dropped connection)
        self._server = self._thread = None

    def add(self, repo_id, files, ref="main", gated=False):
        repo = self.repos.setdefault(repo_id, Repo(gated))
        repo.gated = gated
        return repo.commit(files, ref)

    def add_folder(self, repo_id, folder, ref="main", gated=False, extra=None):
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add(repo_id, {**files, **(extra or {})}, ref, gated)

    def requested(self, method="GET"):
        """Paths of the file downloads (resolve requests) made with `method`."""
        return [p for m, p, _ in self.log if m == method and "/resolve/" in p]

    def start(self):
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub = None

    def log_message(self, *args):  # quiet: requests go to hub.log
        pass

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    # -- answers -------------------------------------------------------------------------------------
    def _send(self, status, body=b"", headers=None, head=False):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj, head=False):
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

    def _error(self, status, code, message, head=False, extra=None):
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                  "X-Error-Message": message, **(extra or {})}, head)

    def _token(self):
        auth = self.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    # -- routing -------------------------------------------------------------------------------------
    def _route(self, head):
        url = urlsplit(self.path)
        self.hub.log.append((self.command, unquote(url.path), self.headers.get("Range")))
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        api = parts[:2] == ["api", "models"]
        if api:
            parts = parts[2:]
        repo_id = "/".join(parts[:2])
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            status = 404 if self._token() else 401
            return self._error(status, "RepoNotFound", "Repository not found", head)
        rest = parts[2:]
        if api and (not rest or rest[0] == "revision"):
            return self._model_info(repo_id, repo, rest[1] if len(rest) > 1 else "main", "blobs=" in url.query, head)
        if api and rest[0] == "tree":
            return self._tree(repo, rest[1], "/".join(rest[2:]), head)
        if not api and rest[:1] == ["resolve"] and len(rest) >= 3:
            return self._resolve(repo_id, repo, rest[1], "/".join(rest[2:]), head)
        self._error(404, "NotFound", "Not found", head)

    def _commit(self, repo, rev, head):
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        return sha

    def _model_info(self, repo_id, repo, rev, blobs, head):
        sha = self._commit(repo, rev, head)
        if sha is None:
            return
        siblings = []
        for path, data in sorted(repo.commits[sha].items()):
            s = {"rfilename": path}
            if blobs:
                e = _entry(path, data)
                s.update(size=e["size"], blobId=e["oid"])
                if "lfs" in e:
                    s["lfs"] = {"size": e["size"], "sha256": e["lfs"]["oid"], "pointerSize": 134}
            siblings.append(s)
        self._json({"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                    "sha": sha, "private": False, "disabled": False, "gated": "manual" if repo.gated else False,
                    "library_name": "diffusers", "tags": ["diffusers"], "siblings": siblings,
                    "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z"}, head)

    def _tree(self, repo, rev, under, head):
        sha = self._commit(repo, rev, head)
        if sha is None:
            return
        files = repo.commits[sha]
        prefix = under + "/" if under else ""
        entries, folders = [], set()
        for path in sorted(files):
            if path.startswith(prefix):
                for i, c in enumerate(path):
                    if c == "/" and i > len(prefix):
                        folders.add(path[:i])
                entries.append(_entry(path, files[path]))
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "path": f}
                    for f in sorted(folders)]
        self._json(entries, head)

    def _resolve(self, repo_id, repo, rev, path, head):
        if repo.gated and self._token() not in self.hub.tokens:
            status = 403 if self._token() else 401
            msg = (f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                   "to access it. Please log in.")
            return self._error(status, "GatedRepo", msg, head)
        sha = self._commit(repo, rev, head)
        if sha is None:
            return
        data = repo.commits[sha].get(path)
        if data is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"", head,
                               {"X-Repo-Commit": sha})
        e = _entry(path, data)
        etag = e["lfs"]["oid"] if "lfs" in e else e["oid"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if "lfs" in e:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start = int(rng[6:].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if head:
            return self._send(200, b"", {**headers, "Content-Length": str(len(data))}, head=True)
        if f"{repo_id}/{path}" in self.hub.cut_once:  # a dropped connection halfway through the body
            self.hub.cut_once.discard(f"{repo_id}/{path}")
            self.send_response(206 if start else 200)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(206 if start else 200, body, headers)
