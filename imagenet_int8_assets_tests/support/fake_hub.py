"""A local fake of the Hugging Face Hub, for tests that run the REAL ``huggingface_hub`` client.

``FakeHub(root, token)`` is a small HTTP server on 127.0.0.1 (a free port, a daemon thread) that
speaks the routes huggingface_hub 0.36 calls for dataset (and model/space) repositories when Xet is
off (``HF_HUB_DISABLE_XET=1``, or simply because the fake never offers the "xet" transfer): the
client's code runs unchanged and talks HTTP to it; nothing of huggingface_hub is mocked.

Routes (checked against huggingface_hub 0.36.2's source)::

    GET    /api/whoami-v2
    POST   /api/repos/create                      {name, organization, private, type} (409 + url if it exists)
    DELETE /api/repos/delete
    POST   /api/validate-yaml                     JSON {content, repoType} or form (RepoCard.validate)
    GET    /api/{type}s/{ns}/{name}[/revision/{rev}]   repo_info: sha, siblings (?blobs=True), private, cardData...
    GET    /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]  ?recursive&expand, Link-header pages (1000, 50 expanded)
    POST   /api/{type}s/{ns}/{name}/paths-info/{rev}     form paths=...&expand=...
    POST   /api/{type}s/{ns}/{name}/preupload/{rev}      uploadMode lfs|regular, shouldIgnore, oid of the remote file
    POST   /api/{type}s/{ns}/{name}/commit/{rev}         NDJSON header/file/lfsFile/deletedFile/deletedFolder
    GET    /api/{type}s/{ns}/{name}/refs, /commits/{rev}
    POST/DELETE /api/{type}s/{ns}/{name}/branch/{branch}, /tag/{rev}; PUT .../settings
    POST   /{prefix}{ns}/{name}.git/info/lfs/objects/batch   (and .../verify)
    PUT    /_fake/lfs/...                         the upload "href" the batch API hands out (signed, no token)
    GET/HEAD /{prefix}{ns}/{name}/resolve/{rev}/{path}      X-Repo-Commit, ETag, X-Linked-Etag/-Size, Range
    GET    /_fake/stats[?repo_id=&repo_type=]    counters as JSON; POST /_fake/reset, POST /_fake/fail (token)

Faults for tests: ``fail`` (answer the next matching requests with an error), ``slow`` (answer them
late) and ``hang`` (never answer them, until ``release`` or ``stop``: a Hub that accepted the
connection and went silent, for the client's timeouts).

Hub behaviours reproduced (the client relies on them):

* a new repository gets the Hub's initial commit ("initial commit" by "system", holding the default
  dataset ``.gitattributes``), so a fresh repository has one file;
* preupload: "lfs" when the size is >= 10 MiB, when the 512-byte sample is binary (a NUL byte or
  not UTF-8), or when the root ``.gitattributes`` routes the path to LFS; else "regular". It also
  returns the ``oid`` of the file already at that path (LFS sha256, else git blob id): the client
  drops additions whose content is already there, and makes no commit at all when nothing is left;
* the LFS batch API gives no ``actions`` for objects this repository already stores (the client
  then logs "... is already present upstream" and sends nothing); others get an upload href on the
  fake (signed with a per-server secret, as S3 URLs are, since the client PUTs without a token) and
  a verify href. The PUT checks the body's size and sha256;
* a commit whose operations change nothing still creates a commit (the Hub makes empty commits;
  huggingface_hub avoids them client-side only); stats mark it ``"empty": True``;
* a regular file >= 10 MiB or binary in a commit is refused (400), as the Hub refuses them;
  ``lfsFile`` must name an object uploaded to this repository; deleting a missing path is a 404
  ``EntryNotFound`` ("A file with this name doesn't exist"); a stale ``parentCommit`` is a 412;
  more than 10,000 entries in one folder is refused; a README.md with invalid YAML is refused;
* git ids are real git ids: blob = sha1("blob <size>\\0" + content) (for LFS files, of the LFS
  pointer file), trees and commits hashed as git does;
* errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound) and
  ``X-Error-Message`` so the client raises its specific exceptions; a wrong token is a 401
  "Invalid credentials in Authorization header" everywhere; a private repository read without a
  token is a 401 RepoNotFound.

Auth: write routes need ``Authorization: Bearer <token>`` (``read_token``, if given, may read
only). The token is compared in memory and never written anywhere (no request logging to files or
stderr; the request log keeps method, path and status only). ``basic_auth=(user, password)`` also
accepts ``Authorization: Basic`` with those credentials as write access: a Hub behind a proxy that
authenticates users with basic auth, reached with ``HF_ENDPOINT=http://user:password@host`` (requests
then sends the URL's user-info as basic auth in place of the Bearer token). Such requests are counted
(``stats()["basic_auth_requests"]``) so that a test can tell the credentials were used. The signed
LFS upload hrefs and the verify href are on the fake's address without credentials, as they would be
outside such a proxy; they need no basic auth.

In-process use: ``HF_ENDPOINT`` and other ``HF_*`` variables are read when huggingface_hub is
imported, so setting them in a running process does nothing; pass ``endpoint=hub.endpoint`` to
``HfApi``/``snapshot_download``/``hf_hub_download``, or use :func:`use_fake_hub` (the ``fake_hub``
fixture does) which also patches ``huggingface_hub.constants`` and sends every request for
``https://huggingface.co`` to the fake through ``huggingface_hub.configure_http_backend``, the
client's documented HTTP hook. That is what makes ``RepoCard.validate()`` testable: it posts to the
hard-coded ``https://huggingface.co/api/validate-yaml`` whatever the endpoint. Subprocesses get
``hub.env()`` in their environment instead.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import copy
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

__all__ = ["FakeHub", "use_fake_hub", "route_huggingface_co", "git_blob_id", "DEFAULT_GITATTRIBUTES"]

LFS_THRESHOLD = 10 * 1024 * 1024  # files of this size or more go to LFS
SAMPLE_SIZE = 512  # what the client sends of each file to /preupload
MAX_ENTRIES_PER_FOLDER = 10_000  # the Hub's limit of files + folders in one folder
MAX_JSON_BODY = 64 * 1024 * 1024
MAX_COMMIT_LINE = 32 * 1024 * 1024  # one NDJSON line: a regular file (< 10 MiB) in base64
MAX_COMMIT_BODY = 4 * 1024 * 1024 * 1024
MAX_LFS_OBJECT = 64 * 1024 * 1024 * 1024
MAX_PREUPLOAD_FILES = 1000
MAX_CONNECTIONS = 64
SOCKET_TIMEOUT = 60.0
HANG_LIMIT = 600.0  # a request held by hang() is dropped after this long even if never released
DRAIN_LIMIT = 256 * 1024 * 1024  # unread request bodies up to this size are read before answering
LOG_SIZE = 10_000
TREE_PAGE = 1000
TREE_PAGE_EXPANDED = 50
COMMITS_PAGE = 50
CHUNK = 1024 * 1024

PLURAL = {"datasets": "dataset", "models": "model", "spaces": "space"}
URL_PREFIX = {"dataset": "datasets/", "space": "spaces/", "model": ""}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")
# The client's own front-matter regex (huggingface_hub.repocard.REGEX_YAML_BLOCK).
YAML_BLOCK = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
EMPTY_CARD_WARNING = "empty or missing yaml metadata in repo card (https://huggingface.co/docs/hub/datasets-cards)"
INVALID_TOKEN = "Invalid credentials in Authorization header"

# The .gitattributes the Hub puts in a new dataset repository (its LFS routing rules).
DEFAULT_GITATTRIBUTES = "\n".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.lz4", "*.mds", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst",
        "*tfevents*", "*.pcm", "*.sam", "*.raw", "*.aac", "*.flac", "*.mp3", "*.ogg", "*.wav",
        "*.bmp", "*.gif", "*.png", "*.tiff", "*.jpg", "*.jpeg", "*.webp", "*.mp4", "*.webm",
    )
) + "\n"


# ---------------------------------------------------------------------------------------------
# git ids and content rules


def git_blob_id(content: bytes) -> str:
    """The git blob id of ``content``: sha1(b"blob <size>\\0" + content)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def is_binary_sample(sample: bytes, complete: bool) -> bool:
    """Binary: a NUL byte, or not UTF-8 (a multi-byte character cut at the end of an incomplete
    sample does not count)."""
    if b"\0" in sample:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=complete)
    except UnicodeDecodeError:
        return True
    return False


def lfs_patterns(gitattributes: bytes | None) -> list[tuple[str, bool]]:
    """(pattern, routed to LFS) rules of a .gitattributes file, in order (later rules win)."""
    rules = []
    for line in (gitattributes or b"").decode("utf-8", "replace").splitlines():
        fields = line.strip().split()
        if len(fields) < 2 or fields[0].startswith("#"):
            continue
        for attr in fields[1:]:
            if attr == "filter=lfs":
                rules.append((fields[0], True))
            elif attr in ("-filter", "!filter") or (attr.startswith("filter=") and attr != "filter=lfs"):
                rules.append((fields[0], False))
    return rules


def matches_lfs(path: str, rules: list[tuple[str, bool]]) -> bool:
    routed = False
    for pattern, lfs in rules:
        pattern = pattern.lstrip("/")
        target = path if "/" in pattern else path.rsplit("/", 1)[-1]
        if fnmatch.fnmatchcase(target, pattern):
            routed = lfs
    return routed


def validate_card(content: str, repo_type: str = "dataset") -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README.md's YAML front matter, as /api/validate-yaml reports them."""
    import yaml

    match = YAML_BLOCK.search(content)
    if match is None:
        return [], [EMPTY_CARD_WARNING]
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as exc:
        return [f"Invalid YAML in README.md metadata: {' '.join(str(exc).split())}"], []
    if data is None:
        return [], [EMPTY_CARD_WARNING]
    if not isinstance(data, dict):
        return [f"YAML metadata must be a mapping of keys to values, got a {type(data).__name__}"], []
    errors = [f'"{key}" must be a string key' for key in data if not isinstance(key, str)]

    def strings(value) -> bool:
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))

    for key in ("license", "language", "tags", "task_categories", "task_ids", "size_categories",
                "annotations_creators", "language_creators", "multilinguality", "source_datasets"):
        if key in data and data[key] is not None and not strings(data[key]):
            errors.append(f'"{key}" must be a string or an array of strings')
    if "pretty_name" in data and not isinstance(data["pretty_name"], str):
        errors.append('"pretty_name" must be a string')
    if repo_type == "dataset" and "configs" in data:
        configs = data["configs"]
        if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
            errors.append('"configs" must be an array of objects')
        else:
            for i, config in enumerate(configs):
                if not isinstance(config.get("config_name"), str):
                    errors.append(f'"configs[{i}].config_name" must be a string')
                files = config.get("data_files")
                if files is not None and not _valid_data_files(files):
                    errors.append(f'"configs[{i}].data_files" must be a path, a list of paths or a list of {{split, path}}')
    return errors, []


def _valid_data_files(files) -> bool:
    if isinstance(files, str):
        return True
    if not isinstance(files, list):
        return False
    for item in files:
        if isinstance(item, str):
            continue
        if not (isinstance(item, dict) and isinstance(item.get("split"), str)):
            return False
        path = item.get("path")
        if not (isinstance(path, str) or (isinstance(path, list) and all(isinstance(p, str) for p in path))):
            return False
    return True


def _card_data(content: bytes | None):
    if content is None:
        return None
    import yaml

    match = YAML_BLOCK.search(content.decode("utf-8", "replace"))
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _now() -> float:
    return time.time()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def _tree_ids(files: dict[str, _Entry]) -> dict[str, str]:
    """Git tree id of every folder ("" is the root) of a set of files."""
    children: dict[str, dict[str, tuple[bytes, str]]] = {"": {}}
    for path, entry in files.items():
        parts = path.split("/")
        for depth in range(1, len(parts)):
            children.setdefault("/".join(parts[:depth]), {})
        children["/".join(parts[:-1])][parts[-1]] = (b"100644", entry.blob_id)
    ids: dict[str, str] = {}
    for folder in sorted(children, key=lambda f: -(f.count("/") + 1) if f else 0):
        entries = children[folder]
        body = b"".join(
            mode + b" " + name.encode() + b"\0" + bytes.fromhex(oid)
            for name, (mode, oid) in sorted(entries.items(), key=lambda kv: kv[0].encode() + (b"/" if kv[1][0] == b"40000" else b""))
        )
        ids[folder] = hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()
        if folder:
            parent, _, name = folder.rpartition("/")
            children[parent][name] = (b"40000", ids[folder])
    return ids


def _validate_path(path) -> str:
    if not isinstance(path, str) or not path or len(path) > 1000:
        raise _HttpError(400, f"Invalid path in commit: {path!r}")
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..", ".git") for p in parts) or "\0" in path:
        raise _HttpError(400, f"Invalid path in commit: {path!r}")
    return path


# ---------------------------------------------------------------------------------------------
# state


@dataclass(frozen=True)
class _Entry:
    size: int
    blob_id: str  # git blob id (of the LFS pointer for LFS files)
    sha256: str | None = None  # LFS object id; None for a regular (git-stored) file

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size)) if self.sha256 else 0


@dataclass
class _Commit:
    id: str
    parent: str | None
    title: str
    description: str
    author: str
    ts: float
    files: dict[str, _Entry]
    trees: dict[str, str]


class _Repo:
    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.type, self.id, self.private = repo_type, repo_id, private
        self.uid = secrets.token_hex(12)
        self.created = _now()
        self.branches: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.commits: dict[str, _Commit] = {}
        self.lfs: dict[str, int] = {}  # LFS objects uploaded to this repository: oid -> size
        self.stats = _fresh_stats()


def _fresh_stats() -> dict:
    return {
        "commits": [],
        "lfs_uploads": 0,  # PUT bodies accepted
        "lfs_bytes": 0,
        "regular_files": 0,  # "file" lines received in commits
        "regular_bytes": 0,
        "preupload_calls": 0,
        "preupload_files": 0,
        "batch_calls": 0,
        "batch_objects": 0,
        "batch_present": 0,  # objects the batch API said were already stored
        "verify_calls": 0,
        "downloads": 0,  # GET .../resolve/... bodies sent
        "download_bytes": 0,
        "errors": [],  # the last error answers about this repository: [status, message]
    }


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


class _Body:
    """A request body read incrementally (Content-Length or chunked), never more than ``limit``."""

    def __init__(self, rfile, headers, limit: int):
        self.rfile, self.limit = rfile, limit
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        length = headers.get("Content-Length")
        try:
            self.remaining = None if self.chunked else int(length or 0)
        except ValueError:
            raise _HttpError(400, "Invalid Content-Length") from None
        self.declared = self.remaining
        if self.remaining is not None and (self.remaining < 0 or self.remaining > limit):
            raise _HttpError(413, f"Request body too large ({self.remaining} bytes, at most {limit})")
        self.total, self.chunk_left, self.eof, self.buf = 0, 0, False, bytearray()

    def _raw(self, n: int) -> bytes:
        if self.eof:
            return b""
        if not self.chunked:
            if self.remaining == 0:
                self.eof = True
                return b""
            data = self.rfile.read(min(n, self.remaining))
            if not data:
                raise _HttpError(400, "Request body ended early")
            self.remaining -= len(data)
        else:
            if self.chunk_left == 0:
                try:
                    size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"x", 16)
                except ValueError:
                    raise _HttpError(400, "Invalid chunked body") from None
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    self.eof = True
                    return b""
                self.chunk_left = size
            data = self.rfile.read(min(n, self.chunk_left))
            if not data:
                raise _HttpError(400, "Request body ended early")
            self.chunk_left -= len(data)
            if self.chunk_left == 0:
                self.rfile.readline(16)
        self.total += len(data)
        if self.total > self.limit:
            raise _HttpError(413, f"Request body too large (more than {self.limit} bytes)")
        return data

    def read(self, n: int = CHUNK) -> bytes:
        if self.buf:
            data, self.buf = bytes(self.buf[:n]), self.buf[n:]
            return data
        return self._raw(n)

    def read_all(self) -> bytes:
        out = bytearray(self.buf)
        self.buf = bytearray()
        while chunk := self._raw(CHUNK):
            out += chunk
        return bytes(out)

    def readline(self, limit: int) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > limit:
                raise _HttpError(413, f"Line too long in request body (more than {limit} bytes)")
            chunk = self._raw(CHUNK)
            if not chunk:
                break
            self.buf += chunk
        end = self.buf.find(b"\n")
        end = len(self.buf) if end < 0 else end + 1
        if end > limit:
            raise _HttpError(413, f"Line too long in request body (more than {limit} bytes)")
        line, self.buf = bytes(self.buf[:end]), self.buf[end:]
        return line

    def drain(self) -> bool:
        """Read what the client still sends (so that it sees the answer); False if too much."""
        if self.remaining is not None and self.remaining > DRAIN_LIMIT:
            return False
        try:
            read = 0
            while chunk := self._raw(CHUNK):
                read += len(chunk)
                if read > DRAIN_LIMIT:
                    return False
        except (_HttpError, OSError):
            return False
        return True


class _Request:
    def __init__(self, handler: _Handler, hub: FakeHub):
        self.handler, self.method = handler, handler.command
        url = urlsplit(handler.path)
        self.raw_path = url.path
        self.segs = [unquote(s) for s in url.path.split("/")[1:]]
        self.query = parse_qs(url.query, keep_blank_values=True)
        self.body: _Body | None = None
        self.role = hub._role(handler.headers.get("Authorization"))
        forwarded = handler.headers.get("X-Forwarded-Host")
        if forwarded and re.fullmatch(r"[A-Za-z0-9.:-]+", forwarded):
            proto = handler.headers.get("X-Forwarded-Proto", "https")
            self.base = f"{'https' if proto == 'https' else 'http'}://{forwarded}"
        else:
            self.base = hub.endpoint

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "").lower() in ("1", "true", "yes")

    def open_body(self, limit: int) -> _Body:
        if self.body is None:
            self.body = _Body(self.handler.rfile, self.handler.headers, limit)
        return self.body

    def json(self, limit: int = MAX_JSON_BODY):
        raw = self.open_body(limit).read_all()
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise _HttpError(400, "Request body is not valid JSON") from None


# ---------------------------------------------------------------------------------------------
# HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1"
    timeout = SOCKET_TIMEOUT

    def do_GET(self):
        self.server.hub._handle(self)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format, *args):  # noqa: A002 - nothing goes to stderr or files
        pass

    def send(self, status: int, body: bytes = b"", content_type: str = "application/json", headers: dict | None = None, length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("Connection", "close")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: FakeHub):
        self.hub = hub
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(timeout=SOCKET_TIMEOUT):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        self.hub._record_server_error(traceback.format_exc(limit=8))


# ---------------------------------------------------------------------------------------------
# the fake Hub


class FakeHub:
    """A fake Hugging Face Hub on 127.0.0.1; see the module documentation.

    ``root`` holds the file bodies (LFS objects and regular blobs); the repositories' history is in
    memory. ``token`` may write, ``read_token`` (optional) may only read. ``namespaces`` limits
    where repositories may be created (None: anywhere). ``gitattributes`` is the content of the
    initial commit of new repositories (None: an empty initial commit). ``public_url`` is the base
    of the repository and commit URLs it returns (create_repo's ``url``, ``commitUrl``): the Hub
    always answers with https://huggingface.co URLs, which the client maps to its endpoint
    (``fix_hf_endpoint_in_url``); ``CommitInfo`` parses ``commitUrl`` against
    ``constants.ENDPOINT`` only, so a URL on the fake's own address would break ``create_commit``
    in a process whose constants still say huggingface.co.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        token: str,
        *,
        user: str = "fake-user",
        read_token: str | None = None,
        namespaces: list[str] | None = None,
        gitattributes: str | None = DEFAULT_GITATTRIBUTES,
        lfs_threshold: int = LFS_THRESHOLD,
        public_url: str = "https://huggingface.co",
        basic_auth: tuple[str, str] | None = None,
    ):
        if not token:
            raise ValueError("FakeHub needs a non-empty token")
        self.root = Path(root)
        self._token = token.encode()
        self._read_token = read_token.encode() if read_token else None
        self.user = user
        self.namespaces = None if namespaces is None else set(namespaces) | {user}
        self.gitattributes = gitattributes
        self.lfs_threshold = lfs_threshold
        self.public_url = public_url.rstrip("/")
        self.basic_auth = basic_auth  # (user, password) accepted as write access; compared in memory only
        self._basic_requests = 0
        self._hangs: list[tuple[str, str]] = []  # (method, path regex) of requests never answered
        self._release = threading.Event()  # set by release()/stop(): the held requests are dropped
        self._secret = secrets.token_bytes(32)  # signs LFS upload hrefs (never the token)
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._faults: list[dict] = []
        self._delays: dict[tuple[str, str], float] = {}  # (method, path regex) -> seconds
        self._log: deque[tuple[str, str, int]] = deque(maxlen=LOG_SIZE)
        self._server_errors: deque[str] = deque(maxlen=100)
        self._requests = 0
        # requests being handled: the log entry of a request is written after its response is
        # sent, so readers of the log wait for them (a client may act on a response first)
        self._in_flight = 0
        self._holding = 0  # of which held by hang(): readers do not wait for these
        self._settled = threading.Condition(self._lock)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"FakeHub(endpoint={self.endpoint if self._server else None!r}, root={str(self.root)!r})"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        if self._server is not None:
            return self
        for sub in ("lfs", "blobs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()  # held requests end (their threads would otherwise wait HANG_LIMIT)
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self, hf_home: str | os.PathLike | None = None, *, token: bool = True) -> dict[str, str]:
        """Environment variables for a subprocess that should use this fake Hub."""
        env = {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_ENABLE_HF_TRANSFER": "0",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        if hf_home is not None:
            env["HF_HOME"] = str(hf_home)
            env["HF_HUB_CACHE"] = str(Path(hf_home) / "hub")
        if token:
            env["HF_TOKEN"] = self._token.decode()
        for key in ("NO_PROXY", "no_proxy"):  # never send loopback requests through a proxy
            current = [h for h in os.environ.get(key, "").split(",") if h.strip()]
            env[key] = ",".join(dict.fromkeys([*current, "127.0.0.1", "localhost"]))
        return env

    # -- Python API for tests -------------------------------------------------------------------

    def repo_exists(self, repo_id: str, repo_type: str = "dataset") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def create_repo(self, repo_id: str, *, repo_type: str = "dataset", private: bool = False) -> None:
        """Create a repository directly (as if by another client); no-op if it exists."""
        with self._lock:
            if (repo_type, repo_id) not in self._repos:
                self._new_repo(repo_type, repo_id, private)

    def commit_files(self, repo_id: str, files: dict[str, bytes], *, repo_type: str = "dataset", revision: str = "main",
                     message: str = "Seed files", delete: tuple[str, ...] = ()) -> str:
        """Commit ``files`` directly (LFS or regular by the preupload rule); returns the commit id."""
        with self._lock:
            repo = self._repo_or_404(repo_type, repo_id)
            head = self._commit_at(repo, revision)
            rules = lfs_patterns(self._read_entry(head.files.get(".gitattributes")))
        ops = []
        for path, content in files.items():
            _validate_path(path)
            if self._upload_mode(path, len(content), content[:SAMPLE_SIZE], rules) == "lfs":
                oid = hashlib.sha256(content).hexdigest()
                self._store(self.root / "lfs" / oid, content)
                with self._lock:
                    repo.lfs[oid] = len(content)
                ops.append(("add", path, _Entry(len(content), git_blob_id(lfs_pointer(oid, len(content))), oid)))
            else:
                blob = git_blob_id(content)
                self._store(self.root / "blobs" / blob, content)
                ops.append(("add", path, _Entry(len(content), blob)))
        ops += [("delete", path, None) for path in delete]
        with self._lock:
            return self._apply(repo, revision, ops, message, "", None, record=False).id

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> str:
        with self._lock:
            return self._commit_at(self._repo_or_404(repo_type, repo_id), revision).id

    def tree(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> dict[str, dict]:
        """path -> {"size", "blob_id", "sha256" (None for regular files)} at ``revision``."""
        with self._lock:
            files = self._commit_at(self._repo_or_404(repo_type, repo_id), revision).files
        return {p: {"size": e.size, "blob_id": e.blob_id, "sha256": e.sha256} for p, e in sorted(files.items())}

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> dict[str, bytes]:
        """path -> content of every file at ``revision``."""
        with self._lock:
            files = dict(self._commit_at(self._repo_or_404(repo_type, repo_id), revision).files)
        return {p: self._read_entry(e) for p, e in sorted(files.items())}

    def history(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> list[dict]:
        """The commits reachable from ``revision``, newest first (the initial commit included)."""
        with self._lock:
            repo = self._repo_or_404(repo_type, repo_id)
            commit, out = self._commit_at(repo, revision), []
            while commit is not None:
                out.append({"id": commit.id, "parent": commit.parent, "title": commit.title, "author": commit.author,
                            "files": len(commit.files)})
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return out

    def stats(self, repo_id: str | None = None, repo_type: str = "dataset") -> dict:
        """Counters of one repository (or {"repos": {"type:id": ...}, ...} of all): its client
        commits (id, parent, message, added/deleted counts and paths, empty), LFS objects and bytes
        uploaded (PUT bodies), regular file bytes received in commits, preupload and batch calls,
        downloads. Waits (at most 10 s) for the requests being handled, whose errors are counted
        after their response is sent."""
        with self._settled:
            self._settled.wait_for(lambda: self._in_flight == self._holding, timeout=10)
            if repo_id is not None:
                return copy.deepcopy(self._repo_or_404(repo_type, repo_id).stats)
            return {
                "requests": self._requests,
                "basic_auth_requests": self._basic_requests,
                "server_errors": list(self._server_errors),
                "repos": {f"{t}:{i}": copy.deepcopy(r.stats) for (t, i), r in sorted(self._repos.items())},
            }

    def reset_stats(self, repo_id: str | None = None, repo_type: str = "dataset") -> None:
        with self._lock:
            repos = [self._repo_or_404(repo_type, repo_id)] if repo_id is not None else list(self._repos.values())
            for repo in repos:
                repo.stats = _fresh_stats()
            if repo_id is None:
                self._log.clear()

    @property
    def request_log(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of the last requests (no query strings, no headers), once the
        requests being handled are logged (at most 10 s)."""
        with self._settled:
            self._settled.wait_for(lambda: self._in_flight == self._holding, timeout=10)
            return list(self._log)

    @property
    def server_errors(self) -> list[str]:
        """Tracebacks of unexpected exceptions in the server (a test can assert there are none)."""
        with self._lock:
            return list(self._server_errors)

    def fail(self, method: str, path_pattern: str, *, status: int = 500, times: int = 1, message: str = "Injected failure") -> None:
        """Answer the next ``times`` requests whose method and URL path (regex search) match with
        ``status`` (e.g. fail("POST", r"/commit/") to kill a commit after its LFS uploads)."""
        re.compile(path_pattern)
        with self._lock:
            self._faults.append({"method": method.upper(), "path": path_pattern, "status": int(status),
                                 "times": int(times), "message": str(message)})

    def slow(self, method: str, path_pattern: str, seconds: float) -> None:
        """Hold every matching request ``seconds`` before answering it (0 removes the delay), e.g.
        slow("POST", r"/commit/", 1.0) leaves time to kill an uploader between its LFS uploads and
        its commit."""
        re.compile(path_pattern)
        if not 0 <= seconds <= 30:
            raise ValueError(f"delay of {seconds}s: use 0 to 30 seconds")
        with self._lock:
            if seconds:
                self._delays[(method.upper(), path_pattern)] = float(seconds)
            else:
                self._delays.pop((method.upper(), path_pattern), None)

    def hang(self, method: str, path_pattern: str) -> None:
        """Never answer the requests whose method and URL path (regex search) match: the server
        accepts them, reads nothing more and sends nothing, until ``release()`` (or ``stop()``, or
        HANG_LIMIT seconds) drops their connection without an answer. E.g. hang("POST", r"/commit/")
        is a Hub that goes silent on a commit, for the client's timeouts."""
        re.compile(path_pattern)
        with self._lock:
            self._hangs.append((method.upper(), path_pattern))

    def release(self) -> None:
        """Stop hanging: the requests held by ``hang`` are dropped unanswered (as if the connection
        broke), and later ones are answered normally."""
        with self._lock:
            self._hangs.clear()
            self._holding = 0  # the released requests are being handled again: readers wait for their log entry
            released, self._release = self._release, threading.Event()
        released.set()

    def _hang_of(self, req: _Request) -> threading.Event | None:
        """The event that releases ``req`` if it is to be held (then counted as held: a held request
        is not "being handled", stats() and the log do not wait for it)."""
        with self._lock:
            if any(m in (req.method, "*") and re.search(p, req.raw_path) for m, p in self._hangs):
                self._holding += 1
                self._settled.notify_all()
                return self._release
        return None

    def _delay_of(self, req: _Request) -> float:
        with self._lock:
            return max(
                (s for (m, p), s in self._delays.items() if m in (req.method, "*") and re.search(p, req.raw_path)),
                default=0.0,
            )

    # -- internals: auth, repos, revisions --------------------------------------------------------

    def _role(self, header: str | None) -> str | None:
        if header is None:
            return None
        scheme, _, value = header.strip().partition(" ")
        value = value.strip().encode()
        if scheme.lower() == "basic" and self.basic_auth is not None and value:
            expected = base64.b64encode(":".join(self.basic_auth).encode())
            if not hmac.compare_digest(value, expected):
                return "invalid"
            with self._lock:
                self._basic_requests += 1
            return "write"
        if scheme.lower() != "bearer" or not value:
            return "invalid"
        if hmac.compare_digest(value, self._token):
            return "write"
        if self._read_token is not None and hmac.compare_digest(value, self._read_token):
            return "read"
        return "invalid"

    def _need_write(self, req: _Request, repo: _Repo | None = None) -> None:
        if req.role == "write":
            return
        if req.role is None:
            if repo is not None and repo.private:
                raise _HttpError(401, "Repository not found", "RepoNotFound")
            raise _HttpError(401, "You must be authenticated to do this: send Authorization: Bearer <token>")
        raise _HttpError(403, "You don't have write access with this token (read-only token)")

    def _repo_or_404(self, repo_type: str, repo_id: str | None) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    def _readable(self, req: _Request, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        if repo.private and req.role not in ("read", "write"):
            raise _HttpError(401, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, req: _Request, repo_type: str, repo_id: str) -> _Repo:
        repo = self._readable(req, repo_type, repo_id) if req.role is not None else self._repos.get((repo_type, repo_id))
        self._need_write(req, repo)
        if repo is None:
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: _Repo, revision: str) -> _Commit:
        rev = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
        if rev.startswith("refs/tags/"):
            commit_id = repo.tags.get(rev[len("refs/tags/"):])
        else:
            commit_id = repo.branches.get(rev) or repo.tags.get(rev)
        if commit_id is None and COMMIT_ID.match(rev) and rev in repo.commits:
            commit_id = rev
        if commit_id is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[commit_id]

    def _branch(self, repo: _Repo, revision: str) -> str:
        rev = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
        if rev not in repo.branches:
            raise _HttpError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        return rev

    def _new_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_type, repo_id, private)
        self._repos[(repo_type, repo_id)] = repo
        files: dict[str, _Entry] = {}
        if self.gitattributes is not None:
            content = self.gitattributes.encode()
            blob = git_blob_id(content)
            self._store(self.root / "blobs" / blob, content)
            files[".gitattributes"] = _Entry(len(content), blob)
        commit = self._make_commit(None, "initial commit", "", "system", files)
        repo.commits[commit.id] = commit
        repo.branches["main"] = commit.id
        return repo

    def _make_commit(self, parent: str | None, title: str, description: str, author: str, files: dict[str, _Entry]) -> _Commit:
        trees = _tree_ids(files)
        ts = _now()
        message = title + (f"\n\n{description}" if description else "")
        who = f"{author} <{author}@users.noreply.huggingface.co> {int(ts)} +0000"
        body = f"tree {trees['']}\n" + (f"parent {parent}\n" if parent else "") + f"author {who}\ncommitter {who}\n\n{message}\n"
        raw = body.encode()
        commit_id = hashlib.sha1(b"commit %d\0" % len(raw) + raw).hexdigest()
        return _Commit(commit_id, parent, title, description, author, ts, files, trees)

    # -- internals: storage ---------------------------------------------------------------------

    def _store(self, path: Path, content: bytes) -> None:
        if path.exists():
            return
        tmp = self.root / "tmp" / secrets.token_hex(8)
        tmp.write_bytes(content)
        os.replace(tmp, path)

    def _entry_path(self, entry: _Entry) -> Path:
        return self.root / "lfs" / entry.sha256 if entry.sha256 else self.root / "blobs" / entry.blob_id

    def _read_entry(self, entry: _Entry | None) -> bytes | None:
        return None if entry is None else self._entry_path(entry).read_bytes()

    def _upload_mode(self, path: str, size: int, sample: bytes, rules) -> str:
        if size >= self.lfs_threshold or is_binary_sample(sample, complete=size <= len(sample)) or matches_lfs(path, rules):
            return "lfs"
        return "regular"

    def _record_server_error(self, text: str) -> None:
        with self._lock:
            self._server_errors.append(text)

    # -- request handling -----------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        status, req, repo_key, error = 500, None, None, ""
        with self._lock:
            self._in_flight += 1
        try:
            req = _Request(handler, self)
            with self._lock:
                self._requests += 1
                fault = self._take_fault(req)
            if fault is not None:
                raise _HttpError(fault["status"], fault["message"])
            released = self._hang_of(req)
            if released is not None:
                released.wait(HANG_LIMIT)
                with self._lock:
                    if not released.is_set():  # HANG_LIMIT passed (release() counts the ones it releases)
                        self._holding -= 1
                status = 499  # dropped without an answer
                handler.close_connection = True
                return
            delay = self._delay_of(req)
            if delay:
                time.sleep(delay)
            if req.role == "invalid":
                raise _HttpError(401, INVALID_TOKEN)
            status = self._route(req)
        except _HttpError as exc:
            status, error = exc.status, " ".join(exc.message.split())
            repo_key = self._repo_key_of(req)
            with contextlib.suppress(OSError):
                self._send_error(handler, req, exc)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            status = 499
            handler.close_connection = True
        except Exception as exc:  # a bug in the fake: answer 500 and keep the traceback for the test
            status = 500
            self._record_server_error(traceback.format_exc(limit=8))
            with contextlib.suppress(OSError):
                self._send_error(handler, req, _HttpError(500, f"FakeHub internal error: {type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._log.append((handler.command, urlsplit(handler.path).path, status))
                if repo_key is not None and repo_key in self._repos and status >= 400:
                    errors = self._repos[repo_key].stats["errors"]
                    errors.append([status, error])
                    del errors[:-50]
                self._in_flight -= 1
                self._settled.notify_all()

    def _take_fault(self, req: _Request) -> dict | None:
        if req.segs[:1] == ["_fake"] and req.segs[1:2] in (["reset"], ["fail"], ["stats"]):
            return None
        for fault in self._faults:
            if fault["times"] > 0 and fault["method"] in (req.method, "*") and re.search(fault["path"], req.raw_path):
                fault["times"] -= 1
                return fault
        return None

    def _repo_key_of(self, req: _Request | None):
        if req is None:
            return None
        segs = req.segs
        if segs[:1] == ["api"] and len(segs) >= 4 and segs[1] in PLURAL:
            return (PLURAL[segs[1]], f"{segs[2]}/{segs[3]}")
        if segs[:1] in (["datasets"], ["spaces"]) and len(segs) >= 3:
            return (PLURAL[segs[0]], f"{segs[1]}/{segs[2].removesuffix('.git')}")
        if segs[:2] == ["_fake", "lfs"] and len(segs) >= 5:
            return (segs[2], f"{segs[3]}/{segs[4]}")
        return None

    def _send_error(self, handler: _Handler, req: _Request | None, exc: _HttpError) -> None:
        message = " ".join(exc.message.split())
        headers = {"X-Error-Message": message.encode("ascii", "replace").decode()[:1000]}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        headers.update(exc.headers)
        if req is not None and req.body is not None and not req.body.eof and not req.body.drain():
            handler.close_connection = True
        elif req is None or req.body is None:
            # the body was never opened: read it when it is small, so that the client sees the answer
            length = handler.headers.get("Content-Length")
            if length and length.isdigit() and int(length) <= DRAIN_LIMIT:
                with contextlib.suppress(OSError):
                    handler.rfile.read(int(length))
        body = exc.body if exc.body is not None else {"error": exc.message}
        handler.send(exc.status, json.dumps(body).encode(), headers=headers)

    def _json(self, handler: _Handler, obj, status: int = 200, headers: dict | None = None, content_type: str = "application/json") -> int:
        handler.send(status, json.dumps(obj, default=str).encode(), content_type=content_type, headers=headers)
        return status

    def _route(self, req: _Request) -> int:
        s, m = req.segs, req.method
        if s[:1] == ["api"]:
            if s[1:] == ["whoami-v2"] and m == "GET":
                return self._whoami(req)
            if s[1:] == ["repos", "create"] and m == "POST":
                return self._create_repo(req)
            if s[1:] == ["repos", "delete"] and m == "DELETE":
                return self._delete_repo(req)
            if s[1:] == ["validate-yaml"] and m == "POST":
                return self._validate_yaml(req)
            if len(s) >= 4 and s[1] in PLURAL:
                return self._repo_api(req, PLURAL[s[1]], f"{s[2]}/{s[3]}", s[4:])
        elif s[:1] == ["_fake"]:
            return self._fake_api(req)
        else:
            lfs = self._match_lfs(s)
            if lfs is not None:
                return self._lfs_api(req, *lfs)
            resolve = self._match_resolve(s)
            if resolve is not None and m in ("GET", "HEAD"):
                return self._resolve(req, *resolve)
        raise _HttpError(404, f"Not found: {m} {req.raw_path} is not a route of the fake Hub")

    @staticmethod
    def _match_lfs(s):
        if s[:1] in (["datasets"], ["spaces"]):
            repo_type, s = PLURAL[s[0]], s[1:]
        else:
            repo_type = "model"
        if len(s) == 6 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"]:
            return repo_type, f"{s[0]}/{s[1][:-4]}", s[5]
        return None

    @staticmethod
    def _match_resolve(s):
        if s[:1] in (["datasets"], ["spaces"]) and len(s) >= 6 and s[3] == "resolve":
            return PLURAL[s[0]], f"{s[1]}/{s[2]}", s[4], "/".join(s[5:])
        if len(s) >= 5 and s[2] == "resolve":
            return "model", f"{s[0]}/{s[1]}", s[3], "/".join(s[4:])
        return None

    # -- routes: account, repositories ----------------------------------------------------------

    def _whoami(self, req: _Request) -> int:
        if req.role is None:
            raise _HttpError(401, "You must be authenticated to call whoami")
        orgs = sorted((self.namespaces or set()) - {self.user})
        return self._json(req.handler, {
            "type": "user", "id": hashlib.sha1(self.user.encode()).hexdigest()[:24], "name": self.user,
            "fullname": self.user, "email": None, "emailVerified": False, "isPro": False, "canPay": False,
            "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": "write"} for o in orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "fake-hub token", "role": req.role}},
        })

    def _create_repo(self, req: _Request) -> int:
        if req.role != "write":
            self._need_write(req)
        body = req.json()
        if not isinstance(body, dict):
            raise _HttpError(400, "Expected a JSON object")
        name, org = body.get("name"), body.get("organization") or self.user
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise _HttpError(400, f"Invalid repo type {repo_type!r}")
        for part in (name, org):
            if not isinstance(part, str) or not NAME.match(part) or "--" in part or ".." in part or part.endswith(".git"):
                raise _HttpError(400, f"Invalid repo name {name!r} / namespace {org!r}")
        if self.namespaces is not None and org not in self.namespaces:
            raise _HttpError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{org}"')
        repo_id = f"{org}/{name}"
        url = f"{self.public_url}/{URL_PREFIX[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise _HttpError(409, f"You already created this {repo_type} repo", body={"error": f"You already created this {repo_type} repo", "url": url})
            repo = self._new_repo(repo_type, repo_id, bool(body.get("private") or False))
        return self._json(req.handler, {"url": url, "name": repo_id, "id": repo.uid})

    def _delete_repo(self, req: _Request) -> int:
        body = req.json()
        if not isinstance(body, dict):
            raise _HttpError(400, "Expected a JSON object")
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or self.user}/{body.get('name')}"
        with self._lock:
            self._writable(req, repo_type, repo_id)
            del self._repos[(repo_type, repo_id)]
        return self._json(req.handler, {})

    def _validate_yaml(self, req: _Request) -> int:
        ctype = req.handler.headers.get("Content-Type", "")
        raw = req.open_body(MAX_JSON_BODY).read_all()
        if "json" in ctype:
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                raise _HttpError(400, "Request body is not valid JSON") from None
        else:
            body = {k: v[-1] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items()}
        if not isinstance(body, dict) or not isinstance(body.get("content"), str):
            raise _HttpError(400, 'Expected {"content": <README.md text>, "repoType": ...}')
        errors, warnings = validate_card(body["content"], body.get("repoType") or "model")
        payload = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
        status = 400 if errors else 200
        if "text/plain" in req.handler.headers.get("Accept", "") and "json" not in ctype:
            text = "\n".join(f"- {e}" for e in errors) if errors else "OK"
            req.handler.send(status, text.encode(), content_type="text/plain; charset=utf-8")
            return status
        return self._json(req.handler, payload, status=status)

    def _repo_api(self, req: _Request, repo_type: str, repo_id: str, rest: list[str]) -> int:
        m, route = req.method, rest[0] if rest else ""
        if route == "" and m == "GET":
            return self._info(req, repo_type, repo_id, None)
        if route == "revision" and len(rest) == 2 and m == "GET":
            return self._info(req, repo_type, repo_id, rest[1])
        if route == "tree" and len(rest) >= 2 and m == "GET":
            return self._tree(req, repo_type, repo_id, rest[1], "/".join(rest[2:]).strip("/"))
        if route == "paths-info" and len(rest) == 2 and m == "POST":
            return self._paths_info(req, repo_type, repo_id, rest[1])
        if route == "preupload" and len(rest) == 2 and m == "POST":
            return self._preupload(req, repo_type, repo_id, rest[1])
        if route == "commit" and len(rest) == 2 and m == "POST":
            return self._commit(req, repo_type, repo_id, rest[1])
        if route == "refs" and len(rest) == 1 and m == "GET":
            return self._refs(req, repo_type, repo_id)
        if route == "commits" and len(rest) == 2 and m == "GET":
            return self._commits(req, repo_type, repo_id, rest[1])
        if route in ("branch", "tag") and len(rest) == 2 and m in ("POST", "DELETE"):
            return self._ref_write(req, repo_type, repo_id, route, rest[1])
        if route == "settings" and len(rest) == 1 and m == "PUT":
            return self._settings(req, repo_type, repo_id)
        raise _HttpError(404, f"Not found: {m} {req.raw_path} is not a route of the fake Hub")

    def _info(self, req: _Request, repo_type: str, repo_id: str, revision: str | None) -> int:
        with self._lock:
            repo = self._readable(req, repo_type, repo_id)
            commit = self._commit_at(repo, revision or "main")
            readme = commit.files.get("README.md")
        blobs = req.flag("blobs")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.sha256:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        data = {
            "_id": repo.uid, "id": repo.id, "author": repo.id.split("/")[0], "sha": commit.id,
            "lastModified": _iso(commit.ts), "createdAt": _iso(repo.created), "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "downloadsAllTime": 0, "likes": 0, "tags": [],
            "siblings": siblings, "usedStorage": sum(e.size for e in commit.files.values()), "xetEnabled": False,
        }
        card = _card_data(self._read_entry(readme))
        if card is not None:
            data["cardData"] = card
        if repo_type == "model":
            data["modelId"] = repo.id
        expand = req.query.get("expand", []) + req.query.get("expand[]", [])
        if expand:
            data = {"_id": data["_id"], "id": data["id"], **{k: data[k] for k in expand if k in data}}
        return self._json(req.handler, data)

    def _entry_json(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict:
        entry = commit.files.get(path)
        if entry is not None:
            out = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": path}
            if entry.sha256:
                out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        else:
            out = {"type": "directory", "oid": commit.trees[path], "size": 0, "path": path}
        if expand:
            last = self._last_commit(repo, commit, path, entry is None)
            out["lastCommit"] = {"id": last.id, "title": last.title, "date": _iso(last.ts)}
            if entry is not None:
                out["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                             "pickleImportScan": None}
        return out

    @staticmethod
    def _last_commit(repo: _Repo, commit: _Commit, path: str, folder: bool) -> _Commit:
        def state(c):
            return c.trees.get(path) if folder else c.files.get(path)

        current = state(commit)
        while commit.parent is not None:
            parent = repo.commits[commit.parent]
            if state(parent) != current:
                return commit
            commit = parent
        return commit

    def _tree(self, req: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> int:
        recursive, expand = req.flag("recursive"), req.flag("expand")
        with self._lock:
            repo = self._readable(req, repo_type, repo_id)
            commit = self._commit_at(repo, revision)
            if path and path not in commit.trees:
                if path in commit.files:
                    raise _HttpError(404, f"{path} is a file, not a folder", "EntryNotFound")
                raise _HttpError(404, f"{path} does not exist on {revision}", "EntryNotFound")
            prefix = f"{path}/" if path else ""
            names = [p for p in list(commit.trees) + list(commit.files) if p and p.startswith(prefix)]
            if not recursive:
                names = [p for p in names if "/" not in p[len(prefix):]]
            names.sort()
            page = TREE_PAGE_EXPANDED if expand else TREE_PAGE
            try:
                start = max(0, int(req.arg("cursor", "0")))
            except ValueError:
                raise _HttpError(400, "Invalid cursor") from None
            items = [self._entry_json(repo, commit, p, expand) for p in names[start:start + page]]
        headers = {}
        if start + page < len(names):
            query = urlencode({"recursive": str(recursive), "expand": str(expand), "cursor": start + page})
            headers["Link"] = f'<{req.base}{req.raw_path}?{query}>; rel="next"'
        return self._json(req.handler, items, headers=headers)

    def _paths_info(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> int:
        ctype = req.handler.headers.get("Content-Type", "")
        raw = req.open_body(MAX_JSON_BODY).read_all()
        if "json" in ctype:
            try:
                body = json.loads(raw or b"{}")
                paths, expand = body.get("paths") or [], bool(body.get("expand"))
            except (ValueError, AttributeError):
                raise _HttpError(400, 'Expected {"paths": [...], "expand": bool}') from None
        else:
            form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
            paths, expand = form.get("paths", []), (form.get("expand", ["False"])[-1].lower() in ("1", "true"))
        if not isinstance(paths, list) or len(paths) > 1000:
            raise _HttpError(413 if isinstance(paths, list) else 400, "paths: a list of at most 1000 paths")
        with self._lock:
            repo = self._readable(req, repo_type, repo_id)
            commit = self._commit_at(repo, revision)
            out = []
            for path in dict.fromkeys(str(p).strip("/") for p in paths):
                if path and (path in commit.files or path in commit.trees):
                    out.append(self._entry_json(repo, commit, path, expand))
        return self._json(req.handler, out)

    def _refs(self, req: _Request, repo_type: str, repo_id: str) -> int:
        with self._lock:
            repo = self._readable(req, repo_type, repo_id)
            data = {
                "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(repo.branches.items())],
                "converts": [],
                "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in sorted(repo.tags.items())],
            }
        if req.flag("include_prs"):
            data["pullRequests"] = []
        return self._json(req.handler, data)

    def _commits(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> int:
        formatted = "formatted" in req.query.get("expand[]", []) + req.query.get("expand", [])
        try:
            start = max(0, int(req.arg("cursor", "0")))
        except ValueError:
            raise _HttpError(400, "Invalid cursor") from None
        with self._lock:
            repo = self._readable(req, repo_type, repo_id)
            commit, chain = self._commit_at(repo, revision), []
            while commit is not None:
                chain.append(commit)
                commit = repo.commits.get(commit.parent) if commit.parent else None
        items = []
        for c in chain[start:start + COMMITS_PAGE]:
            item = {"id": c.id, "title": c.title, "message": c.description, "authors": [{"user": c.author, "avatar": None}],
                    "date": _iso(c.ts)}
            if formatted:
                item["formatted"] = {"title": c.title, "message": c.description}
            items.append(item)
        headers = {}
        if start + COMMITS_PAGE < len(chain):
            query = {"cursor": start + COMMITS_PAGE, **({"expand[]": "formatted"} if formatted else {})}
            headers["Link"] = f'<{req.base}{req.raw_path}?{urlencode(query)}>; rel="next"'
        return self._json(req.handler, items, headers=headers)

    def _ref_write(self, req: _Request, repo_type: str, repo_id: str, kind: str, name: str) -> int:
        body = req.json() if req.method == "POST" else None
        with self._lock:
            repo = self._writable(req, repo_type, repo_id)
            if kind == "branch":
                if req.method == "DELETE":
                    if name == "main":
                        raise _HttpError(403, "You cannot delete the default branch")
                    if repo.branches.pop(name, None) is None:
                        raise _HttpError(404, f"Branch {name} does not exist", "RevisionNotFound")
                    return self._json(req.handler, {})
                if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}", name) or name.startswith("refs/") or ".." in name:
                    raise _HttpError(400, f"Invalid branch name {name!r}")
                start = (body or {}).get("startingPoint") if isinstance(body, dict) else None
                target = self._commit_at(repo, start or "main").id
                if name in repo.branches:
                    raise _HttpError(409, "Reference already exists")
                repo.branches[name] = target
                return self._json(req.handler, {})
            if req.method == "DELETE":
                if repo.tags.pop(name, None) is None:
                    raise _HttpError(404, f"Tag {name} does not exist", "RevisionNotFound")
                return self._json(req.handler, {})
            tag = (body or {}).get("tag") if isinstance(body, dict) else None
            if not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}", tag):
                raise _HttpError(400, f"Invalid tag name {tag!r}")
            target = self._commit_at(repo, name).id
            if tag in repo.tags:
                raise _HttpError(409, "Reference already exists")
            repo.tags[tag] = target
            return self._json(req.handler, {})

    def _settings(self, req: _Request, repo_type: str, repo_id: str) -> int:
        body = req.json()
        if not isinstance(body, dict):
            raise _HttpError(400, "Expected a JSON object")
        if body.get("xetEnabled"):
            raise _HttpError(400, "The fake Hub does not speak Xet")
        with self._lock:
            repo = self._writable(req, repo_type, repo_id)
            if "private" in body:
                repo.private = bool(body["private"])
            return self._json(req.handler, {"private": repo.private})

    # -- routes: uploads ------------------------------------------------------------------------

    def _preupload(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> int:
        if req.flag("create_pr"):
            raise _HttpError(400, "Pull requests are not supported by the fake Hub")
        body = req.json()
        files = body.get("files") if isinstance(body, dict) else None
        if not isinstance(files, list) or len(files) > MAX_PREUPLOAD_FILES:
            raise _HttpError(400, f'Expected {{"files": [...]}} with at most {MAX_PREUPLOAD_FILES} files')
        with self._lock:
            repo = self._writable(req, repo_type, repo_id)
            head = self._commit_at(repo, self._branch(repo, revision))
            repo.stats["preupload_calls"] += 1
            repo.stats["preupload_files"] += len(files)
        rules = lfs_patterns(self._read_entry(head.files.get(".gitattributes")))
        out = []
        for f in files:
            if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not isinstance(f.get("size"), int):
                raise _HttpError(400, "Each file needs a path, a size and a base64 sample")
            try:
                sample = base64.b64decode(f.get("sample") or "", validate=True)
            except ValueError:
                raise _HttpError(400, f"Invalid base64 sample for {f['path']}") from None
            mode = self._upload_mode(f["path"], f["size"], sample[:SAMPLE_SIZE], rules)
            item = {"path": f["path"], "uploadMode": mode, "shouldIgnore": False}
            existing = head.files.get(f["path"])
            if existing is not None:
                item["oid"] = existing.sha256 or existing.blob_id
            out.append(item)
        return self._json(req.handler, {"files": out, "commitOid": head.id})

    def _lfs_api(self, req: _Request, repo_type: str, repo_id: str, action: str) -> int:
        if req.method != "POST" or action not in ("batch", "verify"):
            raise _HttpError(404, f"Not found: {req.method} {req.raw_path}")
        body = req.json()
        lfs_type = "application/vnd.git-lfs+json"
        if action == "verify":
            with self._lock:
                repo = self._writable(req, repo_type, repo_id)
                repo.stats["verify_calls"] += 1
                oid, size = (body or {}).get("oid"), (body or {}).get("size")
                if repo.lfs.get(oid) != size or not (self.root / "lfs" / str(oid)).is_file():
                    raise _HttpError(404, f"LFS object {oid} (size {size}) is not stored")
            return self._json(req.handler, {"message": "Object verified"}, content_type=lfs_type)
        if not isinstance(body, dict) or body.get("operation") != "upload" or not isinstance(body.get("objects"), list):
            raise _HttpError(400, 'Expected {"operation": "upload", "objects": [...]} (only uploads are supported)')
        if len(body["objects"]) > 1000:
            raise _HttpError(413, "At most 1000 objects per batch")
        base = req.base
        with self._lock:
            repo = self._writable(req, repo_type, repo_id)
            repo.stats["batch_calls"] += 1
            objects = []
            for obj in body["objects"]:
                oid, size = (obj or {}).get("oid"), (obj or {}).get("size")
                if not isinstance(oid, str) or not SHA256.match(oid) or not isinstance(size, int) or size < 0:
                    objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                    "error": {"code": 422, "message": "oid must be a sha256 and size a non-negative integer"}})
                    continue
                repo.stats["batch_objects"] += 1
                if oid in repo.lfs:
                    if repo.lfs[oid] != size:
                        objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": f"size {size} differs from the stored object"}})
                    else:
                        repo.stats["batch_present"] += 1
                        objects.append({"oid": oid, "size": size})
                    continue
                if size > MAX_LFS_OBJECT:
                    objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "object too large"}})
                    continue
                sig = self._sign(repo_type, repo_id, oid, size)
                href = f"{base}/_fake/lfs/{repo_type}/{repo_id}/{oid}?{urlencode({'size': size, 'sig': sig})}"
                verify = f"{base}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify"
                objects.append({"oid": oid, "size": size, "authenticated": True,
                                "actions": {"upload": {"href": href}, "verify": {"href": verify}}})
        return self._json(req.handler, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, content_type=lfs_type)

    def _sign(self, repo_type: str, repo_id: str, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{repo_type}/{repo_id}/{oid}/{size}".encode(), hashlib.sha256).hexdigest()

    def _lfs_put(self, req: _Request, repo_type: str, repo_id: str, oid: str) -> int:
        try:
            size = int(req.arg("size", "-1"))
        except ValueError:
            size = -1
        if not hmac.compare_digest(req.arg("sig", ""), self._sign(repo_type, repo_id, oid, size)):
            raise _HttpError(403, "Invalid or missing upload signature")
        body = req.open_body(MAX_LFS_OBJECT)
        if body.declared is not None and body.declared != size:
            raise _HttpError(400, f"Upload of {oid}: Content-Length {body.declared} differs from the announced size {size}")
        tmp = self.root / "tmp" / secrets.token_hex(8)
        digest, received = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                while chunk := body.read(CHUNK):
                    received += len(chunk)
                    if received > size:
                        raise _HttpError(400, f"Upload of {oid}: body larger than the announced size {size}")
                    digest.update(chunk)
                    out.write(chunk)
            if received != size:
                raise _HttpError(400, f"Upload of {oid}: received {received} bytes, expected {size}")
            if digest.hexdigest() != oid:
                raise _HttpError(400, f"Upload of {oid}: the body's sha256 is {digest.hexdigest()}")
            target = self.root / "lfs" / oid
            if target.exists():
                tmp.unlink()
            else:
                os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        with self._lock:
            repo = self._repo_or_404(repo_type, repo_id)
            repo.lfs[oid] = size
            repo.stats["lfs_uploads"] += 1
            repo.stats["lfs_bytes"] += size
        req.handler.send(200, b"", headers={"ETag": f'"{oid}"'})
        return 200

    def _commit(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> int:
        if req.flag("create_pr"):
            raise _HttpError(400, "Pull requests are not supported by the fake Hub")
        with self._lock:
            repo = self._writable(req, repo_type, repo_id)
            branch = self._branch(repo, revision)
        body = req.open_body(MAX_COMMIT_BODY)
        header, ops, regular_bytes, regular_files = None, [], 0, 0
        while line := body.readline(MAX_COMMIT_LINE):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise _HttpError(400, "Each NDJSON line must be {\"key\": ..., \"value\": ...}") from None
            if header is None:
                if key != "header" or not isinstance(value, dict) or not str(value.get("summary") or "").strip():
                    raise _HttpError(400, "The first line must be the header, with a non-empty summary")
                header = value
            elif key == "file":
                path = _validate_path(value.get("path"))
                try:
                    if value.get("encoding", "base64") == "base64":
                        content = base64.b64decode(value.get("content") or "", validate=True)
                    else:
                        content = str(value.get("content") or "").encode()
                except ValueError:
                    raise _HttpError(400, f"Invalid base64 content for {path}") from None
                if len(content) >= self.lfs_threshold:
                    raise _HttpError(400, f"Your push was rejected because it contains files larger than 10 MiB: {path}. Use LFS.")
                if is_binary_sample(content[:SAMPLE_SIZE], complete=len(content) <= SAMPLE_SIZE):
                    raise _HttpError(400, f"Your push was rejected because it contains binary files: {path}. Use LFS.")
                blob = git_blob_id(content)
                self._store(self.root / "blobs" / blob, content)
                regular_bytes += len(content)
                regular_files += 1
                ops.append(("add", path, _Entry(len(content), blob)))
            elif key == "lfsFile":
                path = _validate_path(value.get("path"))
                oid, size = value.get("oid"), value.get("size")
                if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not SHA256.match(oid):
                    raise _HttpError(400, f"Invalid LFS oid for {path}")
                with self._lock:
                    stored = repo.lfs.get(oid)
                if stored is None:
                    raise _HttpError(400, f"Your push was rejected because an LFS pointer pointed to a file that does not exist: {path} (oid {oid})")
                if size is not None and size != stored:
                    raise _HttpError(400, f"LFS file {path}: size {size} differs from the uploaded object ({stored})")
                ops.append(("add", path, _Entry(stored, git_blob_id(lfs_pointer(oid, stored)), oid)))
            elif key in ("deletedFile", "deletedFolder"):
                path = str(value.get("path") or "").strip("/")
                if key == "deletedFile":
                    _validate_path(path)
                ops.append(("delete" if key == "deletedFile" else "delete_folder", path, None))
            else:
                raise _HttpError(400, f"Unknown commit operation {key!r}")
        if header is None:
            raise _HttpError(400, "Empty commit payload: the header line is missing")
        with self._lock:
            commit = self._apply(repo, branch, ops, str(header["summary"]), str(header.get("description") or ""),
                                 header.get("parentCommit"), record=True, regular=(regular_files, regular_bytes))
        url = f"{self.public_url}/{URL_PREFIX[repo_type]}{repo_id}/commit/{commit.id}"
        return self._json(req.handler, {"success": True, "commitOid": commit.id, "commitUrl": url,
                                        "hookOutput": "", "pullRequestUrl": None})

    def _apply(self, repo: _Repo, branch: str, ops: list, title: str, description: str, parent_commit,
               *, record: bool, regular=(0, 0)) -> _Commit:
        """Apply ``ops`` on the head of ``branch`` (caller holds the lock); returns the new commit."""
        branch = self._branch(repo, branch)
        head = repo.commits[repo.branches[branch]]
        if parent_commit is not None and parent_commit != head.id:
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        added, deleted, unchanged = [], [], []
        for op, path, entry in ops:
            if op == "add":
                if files.get(path) == entry:
                    unchanged.append(path)
                files[path] = entry
                added.append(path)
            elif op == "delete":
                if path not in files:
                    raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
                deleted.append(path)
            else:
                gone = [p for p in files if not path or p.startswith(path + "/")]
                if not gone:
                    raise _HttpError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del files[p]
                deleted.extend(gone)
        self._check_layout(files)
        if "README.md" in added and files.get("README.md") != head.files.get("README.md"):
            errors, _ = validate_card(self._read_entry(files["README.md"]).decode("utf-8", "replace"), repo.type)
            if errors:
                raise _HttpError(400, "Invalid metadata in README.md: " + "; ".join(errors))
        commit = self._make_commit(head.id, title, description, self.user, files)
        repo.commits[commit.id] = commit
        repo.branches[branch] = commit.id
        if record:
            stats = repo.stats
            stats["regular_files"] += regular[0]
            stats["regular_bytes"] += regular[1]
            stats["commits"].append({
                "id": commit.id, "parent": head.id, "branch": branch, "message": title, "description": description,
                "added": len(added), "deleted": len(deleted), "added_paths": added, "deleted_paths": deleted,
                "unchanged_paths": unchanged,
                "lfs_paths": [p for op, p, e in ops if op == "add" and e.sha256],
                "regular_paths": [p for op, p, e in ops if op == "add" and not e.sha256],
                "empty": files == head.files,
            })
        return commit

    @staticmethod
    def _check_layout(files: dict[str, _Entry]) -> None:
        folders: dict[str, set[str]] = {}
        for path in files:
            parts = path.split("/")
            for depth in range(len(parts)):
                folder = "/".join(parts[:depth])
                if depth and folder in files:
                    raise _HttpError(400, f"{path} conflicts with the file {folder}")
                folders.setdefault(folder, set()).add(parts[depth])
        for folder, names in folders.items():
            if len(names) > MAX_ENTRIES_PER_FOLDER:
                raise _HttpError(400, f"Too many entries in folder {folder or '/'!r}: {len(names)} (the Hub accepts {MAX_ENTRIES_PER_FOLDER})")

    # -- routes: downloads ----------------------------------------------------------------------

    def _resolve(self, req: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> int:
        with self._lock:
            repo = self._readable(req, repo_type, repo_id)
            commit = self._commit_at(repo, revision)
            entry = commit.files.get(path)
        headers = {"X-Repo-Commit": commit.id, "Accept-Ranges": "bytes"}
        if entry is None:
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", headers=headers)
        if entry.sha256:
            headers.update({"ETag": f'"{entry.sha256}"', "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        else:
            headers["ETag"] = f'"{entry.blob_id}"'
        start, end, status = 0, entry.size - 1, 200
        spec = req.handler.headers.get("Range")
        if spec:
            match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", spec)
            if not match or match.groups() == ("", ""):
                raise _HttpError(416, f"Unsupported Range {spec!r}", headers={"Content-Range": f"bytes */{entry.size}"})
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), entry.size - 1) if last else entry.size - 1
            else:
                start = max(0, entry.size - int(last))
            if start > end or start >= entry.size:
                raise _HttpError(416, f"Range {spec!r} outside of {entry.size} bytes", headers={"Content-Range": f"bytes */{entry.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(0, end - start + 1)
        handler = req.handler
        handler.send(status, b"", content_type="application/octet-stream", headers=headers, length=length)
        if req.method == "GET":
            with open(self._entry_path(entry), "rb") as f:
                f.seek(start)
                left = length
                while left > 0 and (chunk := f.read(min(CHUNK, left))):
                    handler.wfile.write(chunk)
                    left -= len(chunk)
            with self._lock:
                repo.stats["downloads"] += 1
                repo.stats["download_bytes"] += length
        return status

    # -- routes: the fake's own -----------------------------------------------------------------

    def _fake_api(self, req: _Request) -> int:
        s, m = req.segs, req.method
        if s[1:2] == ["lfs"] and len(s) == 6 and m == "PUT" and s[2] in URL_PREFIX:
            return self._lfs_put(req, s[2], f"{s[3]}/{s[4]}", s[5])
        if s[1:] == ["stats"] and m == "GET":
            repo_id = req.arg("repo_id")
            with self._lock:
                data = self.stats(repo_id, req.arg("repo_type", "dataset"))
            return self._json(req.handler, data)
        if s[1:] in (["reset"], ["fail"]) and m == "POST":
            self._need_write(req)
            body = req.json() or {}
            if not isinstance(body, dict):
                raise _HttpError(400, "Expected a JSON object")
            if s[1] == "reset":
                self.reset_stats(body.get("repo_id") or req.arg("repo_id"), body.get("repo_type") or req.arg("repo_type", "dataset"))
            else:
                try:
                    self.fail(str(body["method"]), str(body["path"]), status=int(body.get("status", 500)),
                              times=int(body.get("times", 1)), message=str(body.get("message", "Injected failure")))
                except (KeyError, ValueError, re.error) as exc:
                    raise _HttpError(400, f"Expected {{method, path, status?, times?, message?}}: {exc}") from None
            return self._json(req.handler, {})
        raise _HttpError(404, f"Not found: {m} {req.raw_path} is not a route of the fake Hub")


# ---------------------------------------------------------------------------------------------
# pointing the in-process client at the fake


@contextlib.contextmanager
def route_huggingface_co(endpoint: str, hosts: tuple[str, ...] = ("https://huggingface.co",)):
    """Send every request huggingface_hub makes to ``hosts`` to ``endpoint`` instead, for the block.

    It uses ``huggingface_hub.configure_http_backend`` (the client's documented hook for its HTTP
    sessions): the sessions the client creates get an adapter that rewrites those URLs and tells the
    fake (X-Forwarded-Host/-Proto) which base to use in the URLs it returns. Needed for the client
    code that ignores the endpoint (``RepoCard.validate`` posts to https://huggingface.co) and for
    the module-level functions (``huggingface_hub.create_repo`` ...), bound at import to an HfApi
    whose endpoint was fixed then.
    """
    from huggingface_hub import configure_http_backend, constants
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import _http

    endpoint = endpoint.rstrip("/")

    class RouteToFakeHub(_http.UniqueRequestIdAdapter):
        def send(self, request, *args, **kwargs):
            if constants.HF_HUB_OFFLINE:
                raise OfflineModeIsEnabled(f"Cannot reach {request.url}: offline mode is enabled.")
            for host in hosts:
                if request.url == host or request.url.startswith(host + "/"):
                    request.url = endpoint + request.url[len(host):]
                    request.headers["X-Forwarded-Host"] = urlsplit(host).netloc
                    request.headers["X-Forwarded-Proto"] = urlsplit(host).scheme
                    break
            return super().send(request, *args, **kwargs)

    previous = _http._GLOBAL_BACKEND_FACTORY

    def factory():
        session = previous()
        adapter = RouteToFakeHub()
        for host in hosts:
            session.mount(host + "/", adapter)
        return session

    configure_http_backend(backend_factory=factory)
    try:
        yield
    finally:
        configure_http_backend(backend_factory=previous)


@contextlib.contextmanager
def use_fake_hub(hub: FakeHub, hf_home: str | os.PathLike, monkeypatch):
    """Point this process's huggingface_hub (and its subprocesses, through the environment) at
    ``hub`` for the block: HF_* variables via ``monkeypatch.setenv``, the import-time copies in
    ``huggingface_hub.constants``/``file_download`` via ``monkeypatch.setattr`` (undone with the
    monkeypatch), and https://huggingface.co routed to the fake (undone when the block ends)."""
    from huggingface_hub import constants, file_download, hf_api

    hf_home = Path(hf_home)
    hf_home.mkdir(parents=True, exist_ok=True)
    for key in ("HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in hub.env(hf_home).items():
        monkeypatch.setenv(key, value)
    template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    for module, name, value in (
        (constants, "ENDPOINT", hub.endpoint),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", template),
        (file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template),
        (hf_api, "ENDPOINT", hub.endpoint),
        (constants, "HF_HUB_OFFLINE", False),
        (constants, "HF_HUB_DISABLE_XET", True),
        (constants, "HF_HUB_DISABLE_TELEMETRY", True),
        (constants, "HF_HUB_ENABLE_HF_TRANSFER", False),
        (constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False),
        (constants, "HF_HOME", str(hf_home)),
        (constants, "HF_HUB_CACHE", str(hf_home / "hub")),
        (constants, "HF_ASSETS_CACHE", str(hf_home / "assets")),
        (constants, "HF_XET_CACHE", str(hf_home / "xet")),
        (constants, "HF_TOKEN_PATH", str(hf_home / "token")),
        (constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens")),
    ):
        monkeypatch.setattr(module, name, value)
    with route_huggingface_co(hub.endpoint):
        yield hub
