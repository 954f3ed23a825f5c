"""A small, real HTTP server that speaks enough of the Hugging Face Hub protocol for ``huggingface_hub``.

The real client (``huggingface_hub`` 2.x, httpx-based) is pointed at it with ``HF_ENDPOINT`` and
``HF_HUB_DISABLE_XET=1``; both are read into constants when ``huggingface_hub`` is first imported, so they
must be in ``os.environ`` before that import (see :func:`free_port`). The server then answers:

* repos: ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``GET /api/{models,datasets,spaces}/NS/NAME``
  (and ``/revision/REV``), ``PUT .../settings``;
* listing: ``.../tree/REV[/PATH]``, ``POST .../paths-info/REV``, ``.../refs``, ``.../commits/REV``;
* writes: ``POST .../preupload/REV``, the git-LFS batch API ``NS/NAME.git/info/lfs/objects/batch``, the upload
  ``PUT`` and ``verify`` it hands out (our stand-in for S3), ``POST .../commit/REV`` (ndjson), branches and tags;
* downloads: ``HEAD``/``GET /NS/NAME/resolve/REV/PATH`` with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``,
  ``X-Linked-Size``, ``Content-Length`` and single-range ``Range`` support;
* misc: ``/api/whoami-v2``, ``/api/validate-yaml`` (README uploads), ``/api/agent-harnesses`` (user-agent probe).

Errors carry ``X-Error-Code``/``X-Error-Message`` exactly like the Hub, because that is what the client turns into
``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``EntryNotFoundError`` and ``GatedRepoError``.

Storage: blobs live on disk under ``root/blobs`` named by their sha256; repo metadata (commits as full
path -> file maps, branches, tags) lives in memory and is mirrored to ``root/state.json`` after each change.
"""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

# Files above this size must go through LFS, like on the Hub (which rejects regular files over 10 MB).
LFS_SIZE_THRESHOLD = 10 * 1000 * 1000
# The identity of every caller when the hub runs without a token table ("accept anything").
DEFAULT_USER = "user"
# The Hub's "initial commit" writes this .gitattributes; its filter=lfs patterns decide the upload mode.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
# URL prefix of non-model repos in /resolve and .git URLs ("datasets/org/name/resolve/...").
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
CHUNK = 1 << 20
SHA256 = re.compile(r"[0-9a-f]{64}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now, so ``HF_ENDPOINT`` can be set before the server starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's ``oid``/``ETag``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file git stores in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An HTTP error answer, shaped like the Hub's (the client keys its exceptions on ``X-Error-Code``)."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def repo_not_found(repo_id: str) -> HubError:
    return HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")


@dataclass
class FileEntry:
    """One path of one commit: what the file is, and where its bytes are on disk."""

    size: int
    sha256: str
    git_oid: str  # git blob id of the content (regular file) or of the LFS pointer (LFS file)
    lfs: bool
    blob: str  # storage key under root/blobs; the sha256, unless the test hook `tamper` swapped it

    @property
    def etag(self) -> str:
        """What the client caches the file by: the git blob id, or the sha256 for LFS files."""
        return self.sha256 if self.lfs else self.git_oid

    def tree_json(self, path: str) -> dict[str, Any]:
        """The file as ``/tree`` and ``/paths-info`` list it."""
        item: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            pointer = lfs_pointer(self.sha256, self.size)
            item["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(pointer)}
        return item


@dataclass
class Commit:
    """An immutable snapshot: the full path -> file map, plus its parent."""

    id: str
    parent: str | None
    files: dict[str, FileEntry]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    type: str  # "model" | "dataset" | "space"
    id: str  # "namespace/name"
    private: bool
    created_at: str
    gated: str | bool = False  # False, "auto" or "manual"
    granted: list[str] = field(default_factory=list)  # users allowed through the gate
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit id
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: list[str] = field(default_factory=list)  # sha256 of LFS objects uploaded to this repo

    @property
    def namespace(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def key(self) -> str:
        return f"{self.type}/{self.id}"


class HubStorage:
    """Blobs on disk, repos in memory (mirrored to ``state.json``); every mutation holds one lock."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self._state = self.root / "state.json"
        if self._state.exists():
            self._load()

    # -- blobs ----------------------------------------------------------------------------------

    def blob_path(self, key: str) -> Path:
        return self.blobs / key

    def has_blob(self, sha256: str, size: int) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and path.stat().st_size == size

    def record_lfs_upload(self, repo: Repo, sha256: str) -> None:
        with self.lock:
            if sha256 not in repo.lfs_objects:
                repo.lfs_objects.append(sha256)
                self._save()

    def repo_has_lfs_object(self, repo: Repo, sha256: str, size: int) -> bool:
        """Whether this LFS object was uploaded to ``repo``. The Hub keeps LFS objects per repo, so
        pushing known bytes to another repo uploads them again (the benchmarks depend on that)."""
        with self.lock:
            return sha256 in repo.lfs_objects and self.has_blob(sha256, size)

    def write_blob(self, chunks: Iterable[bytes | memoryview], expected_sha256: str | None = None) -> tuple[str, int]:
        """Stream chunks to a temp file while hashing, then move it to its content address.

        Chunks go straight from the socket to disk (hashlib and file writes run in C), so a 200 MB
        upload never sits in memory. A sha256 that differs from ``expected_sha256`` is a 400.
        """
        digest = hashlib.sha256()
        size = 0
        tmp = self.tmp / f"upload-{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            sha = digest.hexdigest()
            if expected_sha256 is not None and sha != expected_sha256:
                raise HubError(400, None, f"sha256 of the uploaded content is {sha}, expected {expected_sha256}")
            os.replace(tmp, self.blob_path(sha))  # atomic: readers see the old or the whole new file
            return sha, size
        finally:
            tmp.unlink(missing_ok=True)

    def regular_entry(self, content: bytes) -> FileEntry:
        """Store a small file sent inline in a commit."""
        sha, size = self.write_blob([content])
        return FileEntry(size=size, sha256=sha, git_oid=git_blob_oid(content), lfs=False, blob=sha)

    def lfs_entry(self, sha256: str, size: int | None) -> FileEntry:
        """A commit's ``lfsFile`` line: the object must already have been uploaded through the batch API."""
        path = self.blob_path(sha256)
        if not SHA256.fullmatch(sha256) or not path.is_file():
            raise HubError(422, None, f"LFS object {sha256} was not uploaded")
        actual = path.stat().st_size
        if size is not None and size != actual:
            raise HubError(422, None, f"LFS object {sha256} has size {actual}, not {size}")
        return FileEntry(size=actual, sha256=sha256, git_oid=git_blob_oid(lfs_pointer(sha256, actual)), lfs=True,
                         blob=sha256)

    def read_small(self, entry: FileEntry) -> bytes:
        return self.blob_path(entry.blob).read_bytes()

    # -- repos and revisions -----------------------------------------------------------------------

    def get_repo(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get(f"{repo_type}/{repo_id}")

    def create_repo(self, repo_type: str, repo_id: str, *, private: bool) -> Repo:
        """A new repo whose ``main`` holds the Hub's "initial commit" (a .gitattributes)."""
        with self.lock:
            repo = Repo(type=repo_type, id=repo_id, private=private, created_at=_now())
            attributes = self.regular_entry(DEFAULT_GITATTRIBUTES.encode())
            commit = self._new_commit(None, {".gitattributes": attributes}, "initial commit", "", "system")
            repo.commits[commit.id] = commit
            repo.branches["main"] = commit.id
            self.repos[repo.key] = repo
            self._save()
            return repo

    def delete_repo(self, repo: Repo) -> None:
        with self.lock:
            self.repos.pop(repo.key, None)
            self._save()

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch, tag, ``refs/heads/X``/``refs/tags/X`` or (possibly short) commit id -> its commit."""
        with self.lock:
            name = revision
            for prefix in ("refs/heads/", "refs/tags/"):
                if name.startswith(prefix):
                    name = name[len(prefix):]
            commit_id = repo.branches.get(name) or repo.tags.get(name)
            if commit_id is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
                matches = [c for c in repo.commits if c.startswith(revision)]
                commit_id = matches[0] if len(matches) == 1 else None
            if commit_id is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return repo.commits[commit_id]

    def commit(self, repo: Repo, branch: str, operations: Sequence[tuple[str, str, FileEntry | None]], *,
               title: str, message: str, author: str, parent_commit: str | None) -> Commit:
        """Apply ``(kind, path, entry)`` operations on top of ``branch`` and move the branch to the result."""
        with self.lock:
            if branch not in repo.branches:
                self.resolve(repo, branch)  # 404 RevisionNotFound for a revision that does not exist at all
                raise HubError(400, None, f"Invalid rev id: {branch} is not a branch; commits go on branches")
            head = repo.commits[repo.branches[branch]]
            if parent_commit and not head.id.startswith(parent_commit):
                # Same status and wording as the Hub: someone committed since the caller looked.
                raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for kind, path, entry in operations:
                if kind in ("file", "lfsFile"):
                    assert entry is not None
                    files[path] = entry
                elif kind == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                elif kind == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, "EntryNotFound", f"A folder with this name doesn't exist: {path}")
                    for p in doomed:
                        del files[p]
            commit = self._new_commit(head.id, files, title, message, author)
            repo.commits[commit.id] = commit
            repo.branches[branch] = commit.id
            self._save()
            return commit

    def create_ref(self, repo: Repo, kind: str, name: str, revision: str) -> Commit:
        """Create a branch or tag at ``revision``; 409 if it exists, like the Hub."""
        with self.lock:
            refs = repo.branches if kind == "branch" else repo.tags
            if name in refs:
                raise HubError(409, None, f"{kind.capitalize()} {name!r} already exists")
            commit = self.resolve(repo, revision)
            refs[name] = commit.id
            self._save()
            return commit

    def delete_ref(self, repo: Repo, kind: str, name: str) -> None:
        with self.lock:
            refs = repo.branches if kind == "branch" else repo.tags
            if kind == "branch" and name == "main":
                raise HubError(403, None, "Cannot delete the default branch")
            if refs.pop(name, None) is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {name}")
            self._save()

    def last_commit(self, repo: Repo, commit: Commit, path: str) -> Commit:
        """The oldest ancestor over which ``path`` (file or folder) is unchanged: its "last commit"."""
        def snapshot(c: Commit) -> Any:
            if path in c.files:
                return c.files[path]
            return sorted((p, dataclasses.astuple(e)) for p, e in c.files.items() if p.startswith(path + "/"))

        current, wanted = commit, snapshot(commit)
        while current.parent is not None and snapshot(repo.commits[current.parent]) == wanted:
            current = repo.commits[current.parent]
        return current

    def tamper(self, repo: Repo, revision: str, path: str, offsets: Sequence[int] | None = None) -> None:
        """Flip bytes of one file of one commit, keeping its size and its recorded sha256/ETag.

        Copy-on-write: the commit's entry is pointed at a damaged copy, so other commits and repos
        sharing the blob (blobs are content-addressed) keep their good bytes.
        """
        with self.lock:
            commit = self.resolve(repo, revision)
            entry = commit.files.get(path)
            if entry is None:
                raise KeyError(f"{path} is not in {repo.id}@{revision}")
            if entry.size == 0:
                raise ValueError("cannot tamper with an empty file")
            key = f"tampered-{secrets.token_hex(8)}"
            shutil.copyfile(self.blob_path(entry.blob), self.blob_path(key))
            with open(self.blob_path(key), "r+b") as damaged:
                for offset in offsets if offsets is not None else [entry.size // 2]:
                    if not -entry.size <= offset < entry.size:
                        raise ValueError(f"offset {offset} is outside {path} ({entry.size} bytes)")
                    offset %= entry.size  # negative offsets count from the end
                    damaged.seek(offset)
                    byte = damaged.read(1)
                    damaged.seek(offset)
                    damaged.write(bytes([byte[0] ^ 0xFF]))
            commit.files[path] = dataclasses.replace(entry, blob=key)
            self._save()

    def _new_commit(self, parent: str | None, files: dict[str, FileEntry], title: str, message: str,
                    author: str) -> Commit:
        date = _now()
        seed = json.dumps([parent, title, date, secrets.token_hex(8), sorted((p, e.git_oid) for p, e in files.items())])
        return Commit(id=hashlib.sha1(seed.encode()).hexdigest(), parent=parent, files=files, title=title,
                      message=message, author=author, date=date)

    # -- persistence (so a FakeHub restarted on the same root sees the same repos) ---------------------

    def _save(self) -> None:
        state = {key: dataclasses.asdict(repo) for key, repo in self.repos.items()}
        tmp = self._state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state)

    def _load(self) -> None:
        for key, raw in json.loads(self._state.read_text()).items():
            commits = {
                cid: Commit(**{**c, "files": {p: FileEntry(**e) for p, e in c["files"].items()}})
                for cid, c in raw.pop("commits").items()
            }
            self.repos[key] = Repo(**raw, commits=commits)


def _lfs_patterns(gitattributes: str) -> list[str]:
    return [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line and line.split()]


def _matches(path: str, pattern: str) -> bool:
    # gitattributes patterns without a slash match the basename anywhere; others match the whole path.
    target = path if "/" in pattern else path.rsplit("/", 1)[-1]
    return fnmatch.fnmatchcase(target, pattern.replace("**/", "*"))


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not keep the test process alive
    hub: FakeHub

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up is routine; anything else is a server bug the tests should see.
        error = traceback.format_exc()
        if not isinstance(sys.exc_info()[1], OSError):
            self.hub.errors.append(error)


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one request to the storage; every answer has a Content-Length (httpx keeps connections alive)."""

    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    # -- plumbing --------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        # Small JSON answers are written as headers + body; without NODELAY, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        self.server.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass  # the default handler prints every request to stderr

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        # Split before unquoting: the client sends revisions quoted with safe="" ("refs%2Fpr%2F1"),
        # so a revision is always one segment, while file paths keep their slashes.
        self.segments = [unquote(s) for s in split.path.split("/")[1:]]
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.user: str | None = None
        self.body = b""
        self._headers_sent = False
        hub._log.append((self.command, unquote(split.path)))
        streaming = self.command == "PUT" and self.segments[:2] == ["__lfs__", "upload"]
        try:
            if not streaming:
                self.body = b"".join(bytes(c) for c in self._iter_body())
            self._authenticate()
            self._route()
        except HubError as error:
            if streaming:
                self.close_connection = True  # the upload body was not read: the connection is unusable
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a server bug must show up in the test, not hang the client
            hub.errors.append(traceback.format_exc())
            traceback.print_exc()
            self.close_connection = True
            if not self._headers_sent:
                self._send_error(HubError(500, None, "FakeHub internal error (see FakeHub.errors)"))

    def _iter_body(self) -> Iterator[memoryview]:
        """The request body in chunks of up to 1 MiB, from Content-Length or chunked encoding."""
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)

        def read_exactly(count: int) -> Iterator[memoryview]:
            while count > 0:
                got = self.rfile.readinto(view[: min(count, CHUNK)])
                if not got:
                    raise ConnectionResetError("client closed the connection mid-body")
                count -= got
                yield view[:got]

        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield from read_exactly(size)
                self.rfile.readline()  # CRLF after each chunk
        else:
            yield from read_exactly(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, None, "Request body is not valid JSON") from None

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict[str, str] | None = None, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.server.hub.echo_authorization and self.headers.get("Authorization"):
            # A misbehaving server (test hook): the client's credentials come back in a response header.
            self.send_header("X-Echo-Authorization", self.headers["Authorization"])
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._headers_sent = True
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, data: Any, status: int = 200, content_type: str = "application/json",
                   headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), content_type, headers)

    def _send_error(self, error: HubError) -> None:
        # Header values must be latin-1: escape whatever a path or message might bring.
        message = error.message.replace("\n", " ").encode("ascii", "backslashreplace").decode()
        headers = {"X-Error-Message": message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message}, error.status, headers=headers)

    # -- authentication and permissions -------------------------------------------------------------

    def _authenticate(self) -> None:
        """Who is calling (``None``: anonymous); an unknown token is a 401 on every endpoint, like the Hub."""
        tokens = self.server.hub.tokens
        header = self.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        if tokens is None:
            self.user = DEFAULT_USER
        elif token is None:
            self.user = None
        elif token in tokens:
            self.user = tokens[token]
        else:
            # This exact message is how the client tells a bad token from a missing repo.
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _trusting(self) -> bool:
        return self.server.hub.tokens is None

    def _readable_repo(self, repo_type: str, repo_id: str) -> Repo:
        """The repo, or 404 RepoNotFound if it does not exist or is private to someone else (as on the Hub)."""
        repo = self.server.hub.storage.get_repo(repo_type, repo_id)
        if repo is None or (repo.private and not self._trusting() and self.user != repo.namespace):
            raise repo_not_found(repo_id)
        return repo

    def _require_write(self, namespace: str) -> None:
        if self._trusting():
            return
        if self.user is None:
            raise HubError(401, None, "You must be authenticated to do this")
        if self.user != namespace:
            raise HubError(403, None, f"You don't have the rights to write in the namespace {namespace}")

    def _writable_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._readable_repo(repo_type, repo_id)
        self._require_write(repo.namespace)
        return repo

    # -- routing -----------------------------------------------------------------------------------

    def _route(self) -> None:
        s, method = self.segments, self.command
        if s[:1] == ["api"]:
            return self._route_api(s[1:], method)
        if s[:1] == ["__lfs__"] and len(s) == 3:
            if s[1] == "upload" and method == "PUT":
                return self._lfs_upload(s[2])
            if s[1] == "verify" and method == "POST":
                return self._lfs_verify(s[2])
        repo_type = "model"
        if s and s[0] in REPO_TYPES and len(s) > 3:
            repo_type, s = REPO_TYPES[s[0]], s[1:]
        if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        if len(s) == 6 and s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            return self._lfs_batch(repo_type, f"{s[0]}/{s[1][:-4]}")
        raise HubError(404, None, f"FakeHub has no route for {method} {self.path}")

    def _route_api(self, s: list[str], method: str) -> None:
        if s == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if s == ["agent-harnesses"] and method == "GET":
            # Probed once by the client to build its user agent; an empty registry disables detection.
            return self._send_json({"standardEnvVars": [], "harnesses": {}})
        if s == ["validate-yaml"] and method == "POST":
            return self._send_json({"errors": [], "warnings": []})  # uploading a README.md calls this first
        if s == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if s == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if len(s) < 3 or s[0] not in REPO_TYPES:
            raise HubError(404, None, f"FakeHub has no route for {method} {self.path}")
        repo_type, repo_id, rest = REPO_TYPES[s[0]], f"{s[1]}/{s[2]}", s[3:]
        action, arg = (rest[0] if rest else ""), (rest[1] if len(rest) > 1 else "main")
        routes = {
            ("", "GET"): lambda: self._repo_info(repo_type, repo_id, "main"),
            ("revision", "GET"): lambda: self._repo_info(repo_type, repo_id, arg),
            ("tree", "GET"): lambda: self._tree(repo_type, repo_id, arg, "/".join(rest[2:])),
            ("paths-info", "POST"): lambda: self._paths_info(repo_type, repo_id, arg),
            ("refs", "GET"): lambda: self._refs(repo_type, repo_id),
            ("commits", "GET"): lambda: self._commits(repo_type, repo_id, arg),
            ("preupload", "POST"): lambda: self._preupload(repo_type, repo_id, arg),
            ("commit", "POST"): lambda: self._commit(repo_type, repo_id, arg),
            ("branch", "POST"): lambda: self._create_ref(repo_type, repo_id, "branch", arg),
            ("branch", "DELETE"): lambda: self._delete_ref(repo_type, repo_id, "branch", arg),
            ("tag", "POST"): lambda: self._create_ref(repo_type, repo_id, "tag", arg),
            ("tag", "DELETE"): lambda: self._delete_ref(repo_type, repo_id, "tag", arg),
            ("settings", "PUT"): lambda: self._settings(repo_type, repo_id),
        }
        handler = routes.get((action, method))
        if handler is None:
            raise HubError(404, None, f"FakeHub has no route for {method} {self.path}")
        handler()

    # -- account ---------------------------------------------------------------------------------

    def _whoami(self) -> None:
        if self.user is None or (self._trusting() and not self.headers.get("Authorization")):
            raise HubError(401, None, "Invalid credentials in Authorization header")
        self._send_json({
            "type": "user", "id": hashlib.md5(self.user.encode()).hexdigest()[:24], "name": self.user,
            "fullname": self.user, "email": None, "emailVerified": False, "isPro": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "fakehub", "role": "write"}},
        })

    # -- repos -----------------------------------------------------------------------------------

    def _create_repo(self) -> None:
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, None, f"Invalid repo type {repo_type!r}")
        namespace = payload.get("organization") or self.user
        if namespace is None:
            raise HubError(401, None, "You must be authenticated to create a repo")
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.server.hub.url}/{URL_PREFIXES[repo_type]}{repo_id}"
        self._require_write(namespace)
        storage = self.server.hub.storage
        with storage.lock:
            if storage.get_repo(repo_type, repo_id) is not None:
                # The client reads "url" from this 409 too when exist_ok=True.
                return self._send_json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
            storage.create_repo(repo_type, repo_id, private=payload.get("visibility", "public") != "public")
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        payload = self._json_body()
        namespace = payload.get("organization") or self.user or DEFAULT_USER
        repo = self._writable_repo(payload.get("type") or "model", f"{namespace}/{payload['name']}")
        self.server.hub.storage.delete_repo(repo)
        self._send(200)

    def _settings(self, repo_type: str, repo_id: str) -> None:
        repo = self._writable_repo(repo_type, repo_id)
        payload = self._json_body()
        with self.server.hub.storage.lock:
            if "gated" in payload:
                repo.gated = payload["gated"]
            if "private" in payload:
                repo.private = bool(payload["private"])
            if "visibility" in payload:
                repo.private = payload["visibility"] != "public"
            self.server.hub.storage._save()
        self._send_json({})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        storage = self.server.hub.storage
        repo = self._readable_repo(repo_type, repo_id)
        commit = storage.resolve(repo, revision)
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                item = commit.files[path].tree_json(path)
                sibling.update(size=item["size"], blobId=item["oid"])
                if "lfs" in item:
                    sibling["lfs"] = {"size": item["size"], "sha256": item["lfs"]["oid"],
                                      "pointerSize": item["lfs"]["pointerSize"]}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.md5(repo.key.encode()).hexdigest()[:24], "id": repo.id, "author": repo.namespace,
            "sha": commit.id, "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
            "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo.id
        card = self._card_data(commit)
        if card is not None:
            info["cardData"] = card
            info["tags"] = [str(t) for t in card.get("tags") or []]
        self._send_json(info)

    def _card_data(self, commit: Commit) -> dict[str, Any] | None:
        """The YAML front matter of README.md, which the Hub returns as ``cardData``."""
        entry = commit.files.get("README.md")
        if entry is None or entry.size > LFS_SIZE_THRESHOLD:
            return None
        text = self.server.hub.storage.read_small(entry).decode("utf-8", "replace")
        match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
        if match is None:
            return None
        try:
            import yaml

            data = yaml.safe_load(match.group(1))
        except Exception:  # noqa: BLE001 - a broken card is simply not parsed, as on the Hub
            return None
        return data if isinstance(data, dict) else None

    # -- listing ---------------------------------------------------------------------------------

    def _folder_json(self, commit: Commit, folder: str) -> dict[str, Any]:
        children = sorted((p, e.git_oid) for p, e in commit.files.items() if p.startswith(folder + "/"))
        return {"type": "directory", "oid": hashlib.sha1(json.dumps(children).encode()).hexdigest(), "size": 0,
                "path": folder}

    def _entry_json(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        entry = commit.files.get(path)
        item = entry.tree_json(path) if entry is not None else self._folder_json(commit, path)
        if expand:
            last = self.server.hub.storage.last_commit(repo, commit, path)
            item["lastCommit"] = {"id": last.id, "title": last.title, "date": last.date}
        return item

    def _tree(self, repo_type: str, repo_id: str, revision: str, folder: str) -> None:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self.server.hub.storage.resolve(repo, revision)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        expand = self.query.get("expand", "").lower() in ("1", "true")
        folder = folder.strip("/")
        prefix = folder + "/" if folder else ""
        paths: set[str] = set()
        for path in commit.files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            # Every folder on the way is listed too (recursive), or only the first level (not recursive).
            depth = len(parts) if recursive else 1
            paths.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
        if folder and not paths:
            raise HubError(404, "EntryNotFound", f"{folder} does not exist on {revision}",
                           {"X-Repo-Commit": commit.id})
        items = [self._entry_json(repo, commit, p, expand) for p in sorted(paths)]
        self._send_json(items)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self.server.hub.storage.resolve(repo, revision)
        form = parse_qs(self.body.decode())  # the client posts form data: paths=a&paths=b&expand=false
        expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        items = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files or any(p.startswith(path + "/") for p in commit.files):
                items.append(self._entry_json(repo, commit, path, expand))  # missing paths are left out
        self._send_json(items)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._readable_repo(repo_type, repo_id)
        with self.server.hub.storage.lock:
            data = {
                "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                             for n, c in repo.branches.items()],
                "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()],
                "converts": [],
                "pullRequests": [],
            }
        self._send_json(data)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._readable_repo(repo_type, repo_id)
        commit: Commit | None = self.server.hub.storage.resolve(repo, revision)
        items = []
        while commit is not None:
            items.append({"id": commit.id, "title": commit.title, "message": commit.message, "date": commit.date,
                          "authors": [{"user": commit.author}]})
            commit = repo.commits[commit.parent] if commit.parent else None
        self._send_json(items)

    def _create_ref(self, repo_type: str, repo_id: str, kind: str, arg: str) -> None:
        repo = self._writable_repo(repo_type, repo_id)
        payload = self._json_body()
        if kind == "branch":  # POST /branch/{name} {"startingPoint": rev}
            name, revision = arg, payload.get("startingPoint") or "main"
        else:  # POST /tag/{rev} {"tag": name}
            name, revision = payload.get("tag", ""), arg
        if not name or name.startswith("refs/"):
            raise HubError(400, None, f"Invalid {kind} name {name!r}")
        self.server.hub.storage.create_ref(repo, kind, name, revision)
        self._send_json({})

    def _delete_ref(self, repo_type: str, repo_id: str, kind: str, name: str) -> None:
        repo = self._writable_repo(repo_type, repo_id)
        self.server.hub.storage.delete_ref(repo, kind, name)
        self._send_json({})

    # -- uploads ---------------------------------------------------------------------------------

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        """Tell the client, per file, "regular" (inline base64 in the commit) or "lfs" (batch API + PUT)."""
        storage = self.server.hub.storage
        repo = self._writable_repo(repo_type, repo_id)
        commit = storage.resolve(repo, revision)
        attributes = commit.files.get(".gitattributes")
        patterns = _lfs_patterns(storage.read_small(attributes).decode("utf-8", "replace")) if attributes else []
        answers = []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            is_lfs = size > LFS_SIZE_THRESHOLD or b"\0" in sample or any(_matches(path, p) for p in patterns)
            answer: dict[str, Any] = {"path": path, "uploadMode": "lfs" if is_lfs else "regular", "shouldIgnore": False}
            existing = commit.files.get(path)
            if existing is not None:
                # The client skips files whose oid equals its local one (sha256 for LFS, git sha1 otherwise).
                answer["oid"] = existing.etag
            answers.append(answer)
        self._send_json({"files": answers, "commitOid": commit.id})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        """git-LFS batch API: an upload (and verify) action per object we do not have yet."""
        hub = self.server.hub
        repo = self._writable_repo(repo_type, repo_id)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(422, None, "FakeHub only implements LFS uploads (downloads go through /resolve)")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid", "")), int(obj.get("size", -1))
            if not SHA256.fullmatch(oid) or size < 0:
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "Invalid object"}})
            elif hub.storage.repo_has_lfs_object(repo, oid, size):
                objects.append({"oid": oid, "size": size})  # no "actions": the client skips the upload
            else:
                with hub.storage.lock:
                    hub._pending_uploads[oid] = (size, repo)
                objects.append({
                    "oid": oid, "size": size, "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{hub.url}/__lfs__/upload/{oid}", "header": {}},
                        "verify": {"href": f"{hub.url}/__lfs__/verify/{oid}", "header": {}},
                    },
                })
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, oid: str) -> None:
        """The presigned-URL PUT (no Authorization header, as with S3): only objects the batch API announced."""
        storage = self.server.hub.storage
        with storage.lock:
            size, repo = self.server.hub._pending_uploads.get(oid, (None, None))
        if size is None:
            raise HubError(403, None, f"No upload of {oid} was requested through the LFS batch API")
        declared = self.headers.get("Content-Length")
        if declared is not None and int(declared) != size:
            raise HubError(400, None, f"Content-Length {declared} does not match the announced size {size}")
        storage.write_blob(self._iter_body(), expected_sha256=oid)
        with storage.lock:
            self.server.hub._pending_uploads.pop(oid, None)
        storage.record_lfs_upload(repo, oid)
        self._send(200)

    def _lfs_verify(self, oid: str) -> None:
        payload = self._json_body()
        if not self.server.hub.storage.has_blob(oid, int(payload.get("size", -1))):
            raise HubError(404, None, f"LFS object {oid} is missing or has the wrong size")
        self._send_json({"success": True})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        """The ndjson commit: a header line, then file / lfsFile / deletedFile / deletedFolder lines."""
        storage = self.server.hub.storage
        repo = self._writable_repo(repo_type, repo_id)
        if self.query.get("create_pr"):
            raise HubError(400, None, "FakeHub does not implement pull requests")
        header: dict[str, Any] = {}
        operations: list[tuple[str, str, FileEntry | None]] = []
        for line in self.body.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, None, f"Malformed commit line: {line[:200]!r}") from None
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    content = value["content"].encode()
                else:
                    content = base64.b64decode(value["content"])
                operations.append(("file", value["path"], storage.regular_entry(content)))
            elif key == "lfsFile":
                operations.append(("lfsFile", value["path"], storage.lfs_entry(value["oid"], value.get("size"))))
            elif key in ("deletedFile", "deletedFolder"):
                operations.append((key, value["path"], None))
            else:
                raise HubError(400, None, f"Unknown commit operation {key!r}")
        commit = storage.commit(
            repo, revision, operations, title=header.get("summary") or "Update", message=header.get("description", ""),
            author=self.user or DEFAULT_USER, parent_commit=header.get("parentCommit"),
        )
        url = f"{self.server.hub.url}/{URL_PREFIXES[repo_type]}{repo_id}/commit/{commit.id}"
        self._send_json({"success": True, "commitOid": commit.id, "commitUrl": url, "hookOutput": ""})

    # -- downloads -------------------------------------------------------------------------------

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        """HEAD/GET of one file: the client reads its commit, ETag and size from the headers."""
        hub = self.server.hub
        repo = self._readable_repo(repo_type, repo_id)
        commit = hub.storage.resolve(repo, revision)
        if repo.gated and self.user not in repo.granted:
            # 401 for anonymous callers, 403 for users not on the list; the client only looks at the code.
            raise HubError(401 if self.user is None else 403, "GatedRepo",
                           f"Access to model {repo.id} is restricted. You must have access to it and be authenticated "
                           "to access it. Please log in.")
        entry = commit.files.get(path)
        if entry is None:
            # X-Repo-Commit lets the client cache the file's absence for this commit.
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}", {"X-Repo-Commit": commit.id})
        hub._file_log.append((self.command, repo.key, revision, path))
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        start, end, status = 0, entry.size, 200
        wanted = self.headers.get("Range")
        if wanted:
            start, end = self._parse_range(wanted, entry.size)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
            status = 206
        with open(hub.storage.blob_path(entry.blob), "rb") as blob:
            self._send(status, b"", "application/octet-stream", headers, length=end - start)
            if self.command == "GET" and end > start:
                self.connection.sendfile(blob, start, end - start)  # zero-copy from the page cache

    @staticmethod
    def _parse_range(header: str, size: int) -> tuple[int, int]:
        """One ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range -> [start, end); else 416."""
        match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
        unsatisfiable = HubError(416, None, f"Range {header} not satisfiable", {"Content-Range": f"bytes */{size}"})
        if match is None or match.groups() == ("", ""):
            raise unsatisfiable
        first, last = match.groups()
        if first == "":
            start, end = max(size - int(last), 0), size
        else:
            start, end = int(first), (min(int(last) + 1, size) if last else size)
        if start >= size or start >= end:
            raise unsatisfiable
        return start, end


class FakeHub:
    """A fake Hugging Face Hub on 127.0.0.1, serving from a background thread.

    Args:
        root: Where blobs and state are kept (a temp dir).
        port: The port to listen on; 0 picks a free one. Use :func:`free_port` to know it before
            ``huggingface_hub`` is imported.
        tokens: token -> user name. If given, unknown tokens get 401, private repos are visible only to
            their owner's token, and writes need a token whose user is the repo's namespace.
            If ``None``, every request is accepted (and acts as user ``"user"``).

    Usable as a context manager: ``with FakeHub(tmp).start() as hub: ...`` (entering also starts it).
    """

    def __init__(self, root: Path, port: int = 0, tokens: dict[str, str] | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = port
        self.tokens = dict(tokens) if tokens is not None else None
        self.storage = HubStorage(Path(root))
        self.errors: list[str] = []  # tracebacks of server bugs (answered with HTTP 500)
        self.echo_authorization = False  # test hook: answer with the request's Authorization header
        self._log: list[tuple[str, str]] = []
        self._file_log: list[tuple[str, str, str, str]] = []  # (method, repo key, revision, path) of /resolve
        self._pending_uploads: dict[str, tuple[int, Repo]] = {}  # sha256 -> (size, repo) announced by the batch API
        self._connections: set[socket.socket] = set()
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeHub:
        if self._server is None:
            server = _HubHTTPServer((self.host, self.port), HubRequestHandler)
            server.hub = self
            self.port = server.server_address[1]
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                            name=f"FakeHub:{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        # Handler threads of idle keep-alive connections sit in recv(); wake them so they exit now.
        for connection in list(self._connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- test hooks --------------------------------------------------------------------------------

    def _repo(self, repo_id: str, repo_type: str) -> Repo:
        repo = self.storage.get_repo(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id} on this FakeHub")
        return repo

    def tamper(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model",
               offsets: Sequence[int] | None = None) -> None:
        """Flip bytes (by default the middle one) of ``path`` at ``revision``, keeping its size, sha256 and ETag.

        The client trusts the headers, so it downloads the damaged bytes without complaint; only a
        sha256 check on the caller's side can notice. Other commits sharing the content are unaffected.
        """
        self.storage.tamper(self._repo(repo_id, repo_type), revision, path, offsets)

    def make_gated(self, repo_id: str, *, repo_type: str = "model", granted: Iterable[str] = ()) -> None:
        """Gate the repo: info and listings still work, downloads answer 401/403 ``X-Error-Code: GatedRepo``.

        Nobody gets through, owner included, except the users in ``granted``.
        """
        repo = self._repo(repo_id, repo_type)
        with self.storage.lock:
            repo.gated, repo.granted = "manual", list(granted)
            self.storage._save()

    def requests_log(self, method: str | None = None) -> list[tuple[str, str]]:
        """Every request seen, as (method, URL-decoded path without the query), oldest first."""
        return [(m, p) for m, p in list(self._log) if method is None or m == method]

    def clear_requests_log(self) -> None:
        self._log.clear()
        self._file_log.clear()

    def downloaded_files(self, repo_id: str, *, repo_type: str = "model", method: str = "GET") -> list[str]:
        """Repo paths fetched through ``/resolve`` (GET by default; ``method="HEAD"`` for metadata probes)."""
        key = f"{repo_type}/{repo_id}"
        return [p for m, k, _, p in list(self._file_log) if k == key and m == method]
