"""A small fake Hugging Face Hub for offline tests (stdlib only: ``http.server`` + ``threading``).

No Hub is reachable from the test machines, yet the project must test ``--push-to-hub``, PEFT adapter
push/pull and ``SentenceTransformer(repo_id)``. ``FakeHub`` serves, on 127.0.0.1, the subset of the Hub HTTP
API that the real ``huggingface_hub`` 2.4 client (and transformers / sentence-transformers / peft through it)
calls to push and pull repos:

* ``GET  /api/whoami-v2``, ``GET /api/agent-harnesses``, ``POST /api/validate-yaml``
* ``POST /api/repos/create`` (409 when the repo exists) and ``DELETE /api/repos/delete``
* ``GET  /api/{models|datasets|spaces}/{repo_id}`` and ``.../revision/{rev}`` (repo info: sha, siblings)
* ``GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]`` (``recursive``)
* ``POST /api/{type}s/{repo_id}/preupload/{rev}``, ``.../commit/{rev}`` (NDJSON), ``.../branch/{branch}``
* ``HEAD|GET /[{type}s/]{repo_id}/resolve/{rev}/{path}`` (ETag, X-Repo-Commit, Content-Length, Range)

Uploads: the preupload answer is ``uploadMode: "regular"`` for every file, so the client sends every file
inline (base64) in the commit NDJSON and never talks LFS or xet. That holds with ``hf_xet`` installed (it
is, in this venv): the client only hands ``lfs``-mode files to xet. With ``hf_xet`` installed,
``upload_folder`` goes through the client's pipelined uploader, which still makes ONE commit per call as
long as the folder has under ~100 MB of content and under 256 files (beyond that it splits the upload into
several commits named "... (part N)"; ``HF_HUB_DISABLE_XET=1`` restores the client's single-commit path).
Large safetensors files work, at the cost of memory: the client base64-encodes each file in memory, and
so does this server while decoding one NDJSON line (about 4x the file size while it is in flight).

Errors follow the Hub, so the client raises its usual exceptions (``huggingface_hub.errors``):
unknown repo -> 404 ``X-Error-Code: RepoNotFound`` (``RepositoryNotFoundError``); private repo without a
valid token -> 401 + ``RepoNotFound``; missing file -> 404 ``EntryNotFound`` with ``X-Repo-Commit``
(``RemoteEntryNotFoundError``, which transformers relies on to probe optional files); unknown revision ->
404 ``RevisionNotFound``; a token that is not in ``valid_tokens`` -> 401 "Invalid credentials in
Authorization header" on any request (``HfHubHTTPError``, status 401); a write without a token -> 401;
a write to a repo in ``refused_repos`` -> 403 (``HfHubHTTPError``, status 403).

Use in the test process (``patch`` points huggingface_hub at the server, restores everything on exit)::

    from tests.hub_server import FakeHub     # `python -m pytest` runs from the repo root

    with FakeHub() as hub, hub.patch(token=True, cache_dir=tmp_path / "hf-cache"):
        HfApi().create_repo("user/tiny")      # create HfApi objects inside the `with` (or pass endpoint=)
        upload_folder(repo_id="user/tiny", folder_path=model_dir)
        model = AutoModelForCausalLM.from_pretrained("user/tiny")

    # or, without any patching: HfApi(endpoint=hub.endpoint, token=hub.token), hf_hub_download(...,
    # endpoint=hub.endpoint). One client quirk then: create_repo(exist_ok=True) answered 401/403 builds a
    # RepoUrl without the endpoint and fails to parse it, as 127.0.0.1 is not a known Hub host.

``huggingface_hub.constants.ENDPOINT`` is read when huggingface_hub is imported, hence the patching:
``patch`` swaps ``constants.ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``, the module-level
``HfApi`` behind ``huggingface_hub.model_info`` / ``file_exists`` / ``upload_folder`` ..., the Hub origins
trusted for redirects, transformers' cached ``HfApi`` and HfFileSystem's instance cache; it also turns
offline mode off and telemetry off, and optionally sets ``HF_TOKEN`` and the download cache
(``constants.HF_HUB_CACHE``). ``HfApi`` objects built before ``patch`` keep their old endpoint.

Use from a subprocess (the robust way: the env var is read at import)::

    subprocess.run([sys.executable, "convert.py", "--push-to-hub", "user/tiny"],
                   env=hub.env(token=True), check=True)

``hub.env()`` returns a full environment: ``HF_ENDPOINT``, a fresh ``HF_HOME`` (cache) inside the hub's
temp folder, ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_OFFLINE=0``, no proxy for 127.0.0.1, stray
token/cache variables removed, and ``HF_TOKEN`` only when asked (``token=True`` for the hub's default
token, or a string, e.g. a wrong one).

Pytest: the ``fake_hub`` fixture (tests/conftest.py) yields a started ``FakeHub``. Test helpers on the
server side: ``hub.create_repo(...)``, ``hub.files(repo_id)``, ``hub.commits(repo_id)``,
``hub.refused_repos.add(repo_id)``, ``hub.requests`` (a log of "METHOD /path").

Not implemented (the client gets a plain 404 or 400 saying so): LFS/xet transfers, pull requests
(``create_pr``), gated repos, ``paths-info`` (so ``CommitOperationCopy``), commit listing, pagination,
per-namespace permissions (any valid token may write anywhere except ``refused_repos``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_TOKEN = "hf_fakehub_write_token"
DEFAULT_USER = "user"

# URL plural -> repo type, and repo type -> prefix of its web/resolve URLs (as on huggingface.co).
_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# The real Hub starts every repo with a commit holding this file; listing code sees it there too.
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"

_COPY_CHUNK = 1 << 20

# Environment variables that would send a subprocess to another cache, token or Hub than the fake one.
_ENV_TO_CLEAR = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_MODULES_CACHE",
    "TRANSFORMERS_CACHE",
    "SENTENCE_TRANSFORMERS_HOME",
    "HF_OIDC_RESOURCE",
    "HUGGINGFACE_CO_STAGING",
    "TRANSFORMERS_OFFLINE",
)


class HubError(Exception):
    """An error answered the way the Hub does: status, ``X-Error-Code`` / ``X-Error-Message``, JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def git_blob_oid(data: bytes) -> str:
    """Git blob SHA-1 of ``data``: the Hub's oid/ETag of a regular file (the client computes it too, to skip
    unchanged files)."""
    digest = hashlib.sha1(b"blob %d\0" % len(data))
    digest.update(data)
    return digest.hexdigest()


def _now() -> str:
    """The current time in the only format ``huggingface_hub.utils.parse_datetime`` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _validate_repo_path(path: str) -> str:
    """Reject paths that would escape the repo (the client validates too, but the server must not trust it)."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


@dataclass(frozen=True)
class FileEntry:
    """A file of a commit: its git blob oid (also its name in the blob store) and size."""

    oid: str
    size: int


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot of a repo: every file path mapped to its blob."""

    oid: str
    title: str
    date: str
    parent: str | None
    files: Mapping[str, FileEntry]


@dataclass
class Repo:
    """A repo: branches (name -> commit oid) and every commit ever made, so old revisions stay readable."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    uid: str
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """A branch name, or a full or abbreviated commit oid, to its commit (404 RevisionNotFound if neither)."""
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        candidate = revision.lower()
        if 7 <= len(candidate) <= 40 and all(char in "0123456789abcdef" for char in candidate):
            matches = [oid for oid in self.commits if oid.startswith(candidate)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def history(self, branch: str) -> list[Commit]:
        """The commits reachable from ``branch``, newest first."""
        commits = []
        oid: str | None = self.refs[branch]
        while oid is not None:
            commits.append(self.commits[oid])
            oid = self.commits[oid].parent
        return commits


# One commit operation, applied in order: ("add", path, entry), ("delete", path, None), ("delete_folder", ...).
CommitOp = tuple[str, str, FileEntry | None]


class HubStore:
    """Repos in memory, file contents on disk (content-addressed by git oid); safe to use from many threads."""

    def __init__(self, root: Path) -> None:
        self.blob_dir = root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}

    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        """The repo, or None when it does not exist."""
        with self._lock:
            return self._repos.get((repo_type, repo_id))

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo | None:
        """Create a repo with its initial commit on ``main``; None if it already exists."""
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                return None
            uid = hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24]
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now(), uid=uid)
            self._repos[(repo_type, repo_id)] = repo
            self._add_commit(repo, "main", "initial commit", {".gitattributes": self.put_blob(_GITATTRIBUTES)})
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> bool:
        """Forget a repo (its blobs stay: they may be shared); False if it did not exist."""
        with self._lock:
            return self._repos.pop((repo_type, repo_id), None) is not None

    def put_blob(self, data: bytes) -> FileEntry:
        """Store ``data`` (once per content) and return its entry."""
        entry = FileEntry(oid=git_blob_oid(data), size=len(data))
        path = self.blob_path(entry.oid)
        if not path.exists():
            # Write then rename, so that a concurrent reader never sees a half-written blob.
            tmp = path.with_name(f"{entry.oid}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return entry

    def blob_path(self, oid: str) -> Path:
        """Where the content of blob ``oid`` lives."""
        return self.blob_dir / oid

    def commit(self, repo: Repo, branch: str, title: str, ops: Iterable[CommitOp], parent: str | None) -> Commit:
        """Apply ``ops`` on top of ``branch`` and move the branch to the new commit."""
        with self._lock:
            if branch not in repo.refs:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", code="RevisionNotFound")
            head = repo.commits[repo.refs[branch]]
            if parent is not None and not head.oid.startswith(parent.lower()):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for kind, path, entry in ops:
                _apply_op(files, kind, path, entry)
            return self._add_commit(repo, branch, title, files)

    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> bool:
        """Create ``branch`` at ``starting_point`` (default: main's head); False if it already exists."""
        with self._lock:
            if branch in repo.refs:
                return False
            repo.refs[branch] = repo.resolve(starting_point or "main").oid
            return True

    def _add_commit(self, repo: Repo, branch: str, title: str, files: dict[str, FileEntry]) -> Commit:
        """Record a commit of ``files`` on ``branch``; its oid hashes the content and the position in history."""
        parent = repo.refs.get(branch)
        seed = json.dumps([repo.uid, parent, len(repo.commits), title, sorted((p, e.oid) for p, e in files.items())])
        commit = Commit(
            oid=hashlib.sha1(seed.encode()).hexdigest(),
            title=title,
            date=_now(),
            parent=parent,
            files=MappingProxyType(files),
        )
        repo.commits[commit.oid] = commit
        repo.refs[branch] = commit.oid
        return commit


def _apply_op(files: dict[str, FileEntry], kind: str, path: str, entry: FileEntry | None) -> None:
    """Apply one commit operation to a file map, failing like the Hub when a deleted path is missing."""
    if kind == "add" and entry is not None:
        files[path] = entry
        return
    if kind == "delete":
        if path not in files:
            raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
        del files[path]
        return
    prefix = path.rstrip("/") + "/"
    doomed = [name for name in files if name.startswith(prefix)]
    if not doomed:
        raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
    for name in doomed:
        del files[name]


class _Body:
    """The request body, read at most once. The handler always drains it before answering, so that a
    keep-alive connection never mistakes leftover body bytes for the next request."""

    def __init__(self, rfile: Any, headers: Any) -> None:
        self._rfile = rfile
        self._chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._remaining = int(headers.get("Content-Length") or 0)
        self._spool: Any = None

    def readline(self) -> bytes:
        """The next line (NDJSON commits are parsed one line, i.e. one file, at a time)."""
        if self._chunked:
            self._dechunk()
        if self._spool is not None:
            return self._spool.readline()
        if self._remaining <= 0:
            return b""
        line = self._rfile.readline(self._remaining)
        self._remaining = self._remaining - len(line) if line else 0
        return line

    def read(self) -> bytes:
        """The rest of the body."""
        return b"".join(iter(self.readline, b""))

    def drain(self) -> None:
        """Discard whatever the handler did not read."""
        if self._spool is None and not self._chunked:
            while self._remaining > 0:
                data = self._rfile.read(min(self._remaining, _COPY_CHUNK))
                self._remaining = self._remaining - len(data) if data else 0
            return
        while self.readline():
            pass

    def _dechunk(self) -> None:
        """Decode a chunked body into a spooled file (httpx uses chunks for streamed uploads)."""
        spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)
        while True:
            size = int(self._rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self._rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            spool.write(self._rfile.read(size))
            self._rfile.readline()  # the CRLF closing each chunk
        spool.seek(0)
        self._spool, self._chunked = spool, False


class _HubServer(ThreadingHTTPServer):
    """The HTTP server, carrying the ``FakeHub`` its handlers serve."""

    daemon_threads = True  # keep-alive connections must not block shutdown

    def __init__(self, address: tuple[str, int], hub: FakeHub) -> None:
        super().__init__(address, _HubHandler)
        self.hub = hub


class _HubHandler(BaseHTTPRequestHandler):
    """Routes one request to the endpoint that implements it; every answer carries a Content-Length."""

    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects from the Hub
    timeout = 120  # drop idle keep-alive connections eventually
    server: _HubServer

    # --------------------------------------------------------------------------------------------- plumbing

    def do_GET(self) -> None:
        """Serve any method: routing below looks at ``self.command``."""
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: ``hub.requests`` keeps the useful part of the log."""

    @property
    def hub(self) -> FakeHub:
        """The hub this server belongs to."""
        return self.server.hub

    def _dispatch(self) -> None:
        """Authenticate, route, run; turn errors into Hub-shaped answers."""
        self.body = _Body(self.rfile, self.headers)
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.hub.requests.append(f"{self.command} {url.path}")
        try:
            self.user = self._authenticate()
            self._route(url.path.split("/")[1:])()
        except HubError as err:
            self.body.drain()
            self._send_error(err)
        except Exception as err:  # a bug in the fake: answer instead of leaving the client hanging
            traceback.print_exc()
            self.body.drain()
            self._send_error(HubError(500, f"FakeHub internal error: {err!r}"))

    def _send(self, status: int, body: bytes, headers: Mapping[str, str], content_type: str) -> None:
        """Send a complete answer (no body for HEAD, but the GET's Content-Length)."""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        """Send a JSON answer."""
        self._send(status, json.dumps(payload).encode(), headers or {}, "application/json")

    def _send_error(self, err: HubError) -> None:
        """Send an error the way ``hf_raise_for_status`` parses it: code and message in headers, JSON body."""
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code is not None:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message, **err.extra}, status=err.status, headers=headers)

    def _json_body(self) -> dict[str, Any]:
        """The body as a JSON object (400 if it is not one)."""
        raw = self.body.read()
        try:
            payload = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err
        if not isinstance(payload, dict):
            raise HubError(400, "Expected a JSON object")
        return payload

    def _flag(self, name: str) -> bool:
        """A boolean query parameter (the client sends ``true``/``True``/``1``)."""
        return self.query.get(name, ["false"])[0].lower() in ("1", "true")

    # ------------------------------------------------------------------------------------------- routing

    def _route(self, raw_parts: list[str]) -> Callable[[], None]:
        """Map the path to a handler. Segments are unquoted one by one: a revision such as ``refs%2Fpr%2F1``
        is a single segment."""
        parts = [unquote(part) for part in raw_parts]
        if parts[:1] == ["api"]:
            return self._route_api(parts[1:])
        return self._route_resolve(parts)

    def _route_api(self, parts: list[str]) -> Callable[[], None]:
        """Routes under ``/api``."""
        fixed = {
            ("GET", "whoami-v2"): self._api_whoami,
            ("GET", "agent-harnesses"): partial(self._send_json, {"standardEnvVars": [], "harnesses": {}}),
            ("POST", "validate-yaml"): self._api_validate_yaml,
            ("POST", "repos/create"): self._api_create_repo,
            ("DELETE", "repos/delete"): self._api_delete_repo,
        }
        key = (self.command, "/".join(parts))
        if key in fixed:
            return fixed[key]
        if len(parts) >= 3 and parts[0] in _TYPE_FROM_PLURAL:
            route = self._route_repo_api(_TYPE_FROM_PLURAL[parts[0]], f"{parts[1]}/{parts[2]}", parts[3:])
            if route is not None:
                return route
        raise HubError(404, f"FakeHub does not implement {self.command} /api/{'/'.join(parts)}")

    def _route_repo_api(self, repo_type: str, repo_id: str, rest: list[str]) -> Callable[[], None] | None:
        """Routes under ``/api/{type}s/{namespace}/{name}``."""
        method, action, args = self.command, rest[0] if rest else None, rest[1:]
        if method == "GET" and action is None:
            return partial(self._api_repo_info, repo_type, repo_id, "main")
        if method == "GET" and action == "revision" and len(args) == 1:
            return partial(self._api_repo_info, repo_type, repo_id, args[0])
        if method == "GET" and action == "tree" and args:
            return partial(self._api_tree, repo_type, repo_id, args[0], "/".join(args[1:]))
        posts = {"preupload": self._api_preupload, "commit": self._api_commit, "branch": self._api_create_branch}
        if method == "POST" and action in posts and len(args) == 1:
            return partial(posts[action], repo_type, repo_id, args[0])
        return None

    def _route_resolve(self, parts: list[str]) -> Callable[[], None]:
        """``/[{type}s/]{namespace}/{name}/resolve/{rev}/{path}``: file downloads."""
        repo_type = "model"
        if parts and parts[0] in ("datasets", "spaces"):
            repo_type, parts = _TYPE_FROM_PLURAL[parts[0]], parts[1:]
        if self.command in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            path = "/".join(parts[4:])
            return partial(self._resolve_file, repo_type, f"{parts[0]}/{parts[1]}", parts[3], path)
        raise HubError(404, f"FakeHub does not implement {self.command} /{'/'.join(parts)}")

    # ---------------------------------------------------------------------------------------------- auth

    def _authenticate(self) -> str | None:
        """The user behind the bearer token; None without a token. Like the Hub, an unknown token is
        rejected on every endpoint, even for public reads."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            # This exact message makes the client raise a plain 401 HfHubHTTPError, not RepositoryNotFoundError.
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _require_user(self) -> str:
        """The authenticated user, or 401 for anonymous writes."""
        if self.user is None:
            raise HubError(401, "You must be authenticated to do this: send 'Authorization: Bearer <token>'")
        return self.user

    def _check_push_allowed(self, repo_id: str) -> None:
        """403 for repos the test asked the hub to refuse."""
        if repo_id in self.hub.refused_repos:
            raise HubError(403, f"You don't have write access to {repo_id} (refused by FakeHub)")

    def _repo_for_read(self, repo_type: str, repo_id: str) -> Repo:
        """The repo if the caller may read it; a private repo looks missing to anonymous callers, as on the
        Hub (401 + RepoNotFound, which the client turns into RepositoryNotFoundError)."""
        repo = self.hub.store.get(repo_type, repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        if repo.private and self.user is None:
            raise HubError(401, "Invalid username or password.", code="RepoNotFound")
        return repo

    def _repo_for_write(self, repo_type: str, repo_id: str) -> Repo:
        """The repo if the caller may push to it."""
        self._require_user()
        repo = self._repo_for_read(repo_type, repo_id)
        self._check_push_allowed(repo_id)
        return repo

    # ----------------------------------------------------------------------------------------- endpoints

    def _api_whoami(self) -> None:
        """``whoami``: who the token belongs to, with a write-role token."""
        user = self._require_user()
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": f"{user}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake-hub", "role": "write"}},
            }
        )

    def _api_validate_yaml(self) -> None:
        """README metadata validation (called before uploading a README.md): everything is valid."""
        self.body.drain()
        self._send_json({"errors": [], "warnings": []})

    def _api_create_repo(self) -> None:
        """Create a repo; 409 if it exists (the client turns that into success with ``exist_ok=True``)."""
        user = self._require_user()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        name, namespace = payload.get("name"), payload.get("organization") or user
        if repo_type not in _URL_PREFIX or not isinstance(name, str) or not name or "/" in name:
            raise HubError(400, f"Invalid repo name or type: {name!r} ({repo_type!r})")
        repo_id = f"{namespace}/{name}"
        self._check_push_allowed(repo_id)
        private = payload.get("visibility") == "private" or payload.get("private") is True
        url = self.hub.repo_url(repo_type, repo_id)
        repo = self.hub.store.create_repo(repo_type, repo_id, private)
        if repo is None:
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        self._send_json({"url": url, "name": repo_id, "id": repo.uid})

    def _api_delete_repo(self) -> None:
        """Delete a repo (404 RepoNotFound if missing)."""
        user = self._require_user()
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        self._check_push_allowed(repo_id)
        if not self.hub.store.delete_repo(payload.get("type") or "model", repo_id):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        self._send_json({})

    def _api_repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        """``model_info`` / ``repo_info``: sha of the revision and its files (sizes with ``blobs=true``)."""
        repo = self._repo_for_read(repo_type, repo_id)
        commit = repo.resolve(revision)
        with_blobs = self._flag("blobs")
        siblings = [
            {"rfilename": path, **({"size": entry.size, "blobId": entry.oid} if with_blobs else {})}
            for path, entry in sorted(commit.files.items())
        ]
        info = {
            "_id": repo.uid,
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(entry.size for entry in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        self._send_json(info)

    def _api_tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        """``list_repo_tree``: the entries under ``path``, children only unless ``recursive``."""
        repo = self._repo_for_read(repo_type, repo_id)
        commit = repo.resolve(revision)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        files = {name: entry for name, entry in commit.files.items() if name.startswith(prefix)}
        if prefix and not files:
            raise HubError(
                404, f"{path} does not exist on {revision}", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid}
            )
        self._send_json(_tree_entries(commit.oid, prefix, files, recursive=self._flag("recursive")))

    def _api_preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        """Tell the client to send every file inline ("regular"), with the current oid of each path so that
        it can skip unchanged files, as the Hub does."""
        if self._flag("create_pr"):
            raise HubError(400, "FakeHub does not support pull requests (create_pr)")
        repo = self._repo_for_write(repo_type, repo_id)
        head = repo.resolve(revision)
        files = []
        for item in self._json_body().get("files", []):
            current = head.files.get(item.get("path"))
            files.append(
                {
                    "path": item.get("path"),
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": current.oid if current else None,
                }
            )
        self._send_json({"files": files, "commitOid": head.oid})

    def _api_commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        """Apply an NDJSON commit (header, file, deletedFile, deletedFolder lines) to a branch."""
        if self._flag("create_pr"):
            raise HubError(400, "FakeHub does not support pull requests (create_pr)")
        repo = self._repo_for_write(repo_type, repo_id)
        header, ops = self._read_commit_lines()
        commit = self.hub.store.commit(repo, revision, header.get("summary") or "", ops, header.get("parentCommit"))
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.repo_url(repo_type, repo_id)}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _read_commit_lines(self) -> tuple[dict[str, Any], list[CommitOp]]:
        """Parse the commit body one line at a time, storing each file's content as soon as it is decoded."""
        header: dict[str, Any] = {}
        ops: list[CommitOp] = []
        for line in iter(self.body.readline, b""):
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                ops.append(("add", _validate_repo_path(value["path"]), self.hub.store.put_blob(_file_content(value))))
            elif key in ("deletedFile", "deletedFolder"):
                kind = "delete" if key == "deletedFile" else "delete_folder"
                ops.append((kind, _validate_repo_path(value["path"].rstrip("/")), None))
            elif key == "lfsFile":
                raise HubError(400, "FakeHub asks for inline ('regular') uploads; LFS/xet files are not supported")
            else:
                raise HubError(400, f"Unknown commit operation: {key!r}")
        return header, ops

    def _api_create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        """``create_branch``: 409 if it exists (``exist_ok`` is handled by the client)."""
        repo = self._repo_for_write(repo_type, repo_id)
        if not self.hub.store.create_branch(repo, branch, self._json_body().get("startingPoint")):
            raise HubError(409, "Reference already exists")
        self._send_json({})

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        """HEAD/GET of a file, with the headers ``get_hf_file_metadata`` needs: ETag, X-Repo-Commit and the
        real size. A missing file is 404 EntryNotFound with X-Repo-Commit, so clients cache its absence."""
        repo = self._repo_for_read(repo_type, repo_id)
        commit = repo.resolve(revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        start, end = self._byte_range(entry.size)
        headers = {"ETag": f'"{entry.oid}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        partial_content = (start, end) != (0, entry.size)
        if partial_content:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        self.send_response(206 if partial_content else 200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "GET":
            self._stream_blob(entry.oid, start, end)

    def _byte_range(self, size: int) -> tuple[int, int]:
        """The requested ``[start, end)`` (``http_get`` resumes with ``Range: bytes=N-``); the whole file
        without a usable Range header."""
        spec = self.headers.get("Range", "")
        if self.command != "GET" or not spec.startswith("bytes=") or "," in spec:
            return 0, size
        first, _, last = spec[len("bytes=") :].partition("-")
        try:
            start, end = (int(first), int(last) + 1 if last else size) if first else (size - int(last), size)
        except ValueError:
            return 0, size
        if not 0 <= start < size:
            raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
        return start, min(end, size)

    def _stream_blob(self, oid: str, start: int, end: int) -> None:
        """Copy ``[start, end)`` of a blob to the client in chunks (files may be large)."""
        with self.hub.store.blob_path(oid).open("rb") as blob:
            blob.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = blob.read(min(remaining, _COPY_CHUNK))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


def _file_content(value: Mapping[str, Any]) -> bytes:
    """The content of a ``file`` commit line (base64, as the client sends it)."""
    content = value.get("content", "")
    if value.get("encoding", "base64") != "base64":
        return content.encode()
    try:
        return base64.b64decode(content, validate=True)
    except binascii.Error as err:
        raise HubError(400, f"Invalid base64 content for {value.get('path')!r}") from err


def _tree_entries(
    commit_oid: str, prefix: str, files: Mapping[str, FileEntry], recursive: bool
) -> list[dict[str, Any]]:
    """Tree listing entries (files and the folders implied by their paths) below ``prefix``."""
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in sorted(files.items()):
        parts = name[len(prefix) :].split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            folder = prefix + "/".join(parts[:depth])
            folder_oid = hashlib.sha1(f"{commit_oid}:{folder}".encode()).hexdigest()
            entries.setdefault(folder, {"type": "directory", "oid": folder_oid, "size": 0, "path": folder})
        if recursive or len(parts) == 1:
            entries[name] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": name}
    return list(entries.values())


class FakeHub:
    """A fake Hugging Face Hub on 127.0.0.1 (see the module docstring); a context manager.

    Args:
        valid_tokens: tokens the hub accepts; a mapping gives each token its user name, otherwise they all
            belong to ``username``. ``hub.token`` is the first one.
        username: the user of the tokens (and the namespace of ``create_repo("name")``).
        refused_repos: repo ids to which pushes (create, preupload, commit, branch) get 403; the set
            ``hub.refused_repos`` can also be changed while the hub runs.
        root: where to keep repo contents and the ``env()`` caches; default: a temp folder removed by stop().
    """

    def __init__(
        self,
        *,
        valid_tokens: Iterable[str] | Mapping[str, str] = (DEFAULT_TOKEN,),
        username: str = DEFAULT_USER,
        refused_repos: Iterable[str] = (),
        root: str | Path | None = None,
    ) -> None:
        if isinstance(valid_tokens, Mapping):
            self.tokens = dict(valid_tokens)
        else:
            self.tokens = {token: username for token in valid_tokens}
        self.username = username
        self.refused_repos = set(refused_repos)
        self.requests: list[str] = []
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="fake-hub-")) if root is None else Path(root)
        self.store = HubStore(self.root / "store")
        self._server: _HubServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    @property
    def valid_tokens(self) -> set[str]:
        """The tokens the hub accepts."""
        return set(self.tokens)

    @property
    def token(self) -> str:
        """A token the hub accepts (the first one given)."""
        return next(iter(self.tokens))

    def start(self) -> FakeHub:
        """Listen on a free port of 127.0.0.1 and serve from a daemon thread."""
        self._server = _HubServer(("127.0.0.1", 0), self)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and delete the temp folder (when the hub made it)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ server-side helpers

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        """The web URL of a repo, as the Hub returns it from create_repo."""
        return f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"

    def create_repo(self, repo_id: str, *, private: bool = False, repo_type: str = "model") -> None:
        """Create a repo directly (test setup), without going through HTTP or auth."""
        self.store.create_repo(repo_type, repo_id, private)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Every file of a revision with its content, for assertions."""
        commit = self._repo(repo_id, repo_type).resolve(revision)
        return {path: self.store.blob_path(entry.oid).read_bytes() for path, entry in commit.files.items()}

    def commits(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> list[str]:
        """Titles of the commits on ``branch``, newest first (the repo's initial commit last)."""
        return [commit.title for commit in self._repo(repo_id, repo_type).history(branch)]

    def _repo(self, repo_id: str, repo_type: str) -> Repo:
        repo = self.store.get(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"No {repo_type} repo {repo_id!r} on the fake hub")
        return repo

    # ------------------------------------------------------------------------------- pointing clients

    def env(
        self,
        token: bool | str | None = None,
        *,
        hf_home: str | Path | None = None,
        base: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """A full environment for a subprocess that talks to this hub (see the module docstring).

        Args:
            token: True for ``hub.token``, a string for that token (e.g. a wrong one), None/False for none.
            hf_home: the HF_HOME (caches) to use; default: a new empty folder inside the hub's root.
            base: the environment to start from; default: ``os.environ``.
        """
        env = dict(os.environ if base is None else base)
        for name in _ENV_TO_CLEAR:
            env.pop(name, None)
        home = Path(hf_home) if hf_home is not None else Path(tempfile.mkdtemp(prefix="hf-home-", dir=self.root))
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HOME=str(home),
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
        )
        for name in ("NO_PROXY", "no_proxy"):  # a proxy from the environment must not intercept 127.0.0.1
            env[name] = ",".join(filter(None, [env.get(name), "127.0.0.1", "localhost"]))
        if token:
            env["HF_TOKEN"] = self.token if token is True else str(token)
        return env

    def patch(
        self, token: bool | str | None = None, cache_dir: str | Path | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Point huggingface_hub in this process at the hub, until the ``with`` block ends.

        Args:
            token: True for ``hub.token``, a string for that token; sets ``HF_TOKEN`` meanwhile. None/False
                leaves ``HF_TOKEN`` unset.
            cache_dir: download cache to use meanwhile (``constants.HF_HUB_CACHE``); default: unchanged.
        """
        chosen = (self.token if token is True else str(token)) if token else None
        return patch_huggingface_hub(self.endpoint, token=chosen, cache_dir=cache_dir)


@contextlib.contextmanager
def patch_huggingface_hub(
    endpoint: str, *, token: str | None = None, cache_dir: str | Path | None = None
) -> Iterator[None]:
    """Point huggingface_hub (and transformers' cached client) at ``endpoint``; restore all on exit.

    Everything that copied ``constants.ENDPOINT`` at import time is swapped (see the module docstring).
    ``token`` sets ``HF_TOKEN`` (None unsets it, so that a stray token cannot leak in), and ``cache_dir``
    the default download cache.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    saved: list[tuple[object, str, object]] = []

    def swap(owner: object, name: str, value: object) -> None:
        if hasattr(owner, name):
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, value)

    host = urlsplit(endpoint).hostname or "127.0.0.1"
    swap(constants, "ENDPOINT", endpoint)
    swap(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    swap(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS) | {host})
    swap(constants, "HF_HUB_OFFLINE", False)  # the fake hub is local: an offline test setup may still use it
    swap(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    if cache_dir is not None:
        swap(constants, "HF_HUB_CACHE", str(cache_dir))
    swap(hf_api.api, "endpoint", endpoint)  # the HfApi behind huggingface_hub.model_info, file_exists, ...
    if hasattr(_http, "_url_origin") and hasattr(_http, "_HUB_ORIGINS"):
        swap(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS) | {_http._url_origin(endpoint)})
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None:
        swap(transformers_hub, "_hf_api", None)  # transformers caches one HfApi: have it rebuilt
    _clear_hf_file_system_cache()
    saved_env = {name: os.environ.get(name) for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    _set_token_env(token)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
        late_import = sys.modules.get("transformers.utils.hub")
        if late_import is not None and late_import is not transformers_hub:
            late_import._hf_api = None  # imported inside the block: drop the client built for the fake hub
        _clear_hf_file_system_cache()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _set_token_env(token: str | None) -> None:
    """Make ``token`` the one huggingface_hub finds (it reads ``HF_TOKEN`` at each request)."""
    os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)
    if token is None:
        os.environ.pop("HF_TOKEN", None)
    else:
        os.environ["HF_TOKEN"] = token


def _clear_hf_file_system_cache() -> None:
    """fsspec caches HfFileSystem instances, each with the endpoint it was built with."""
    module = sys.modules.get("huggingface_hub.hf_file_system")
    if module is not None:
        module.HfFileSystem.clear_instance_cache()
