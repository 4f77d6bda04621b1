"""Publishing a built dataset to a Hugging Face Hub dataset repository (no Dagster import).

The repository holds what readers of the published Imagenet.int8 expect, read the same way::

    index.json, build.json              the merged MDS index (it names the shard folders) and the build record
    classes/<class>/<version>/...       the shard folders the index names (each with its own index.json)
    README.md                           the dataset card
    report/...                          the reconstruction report's summary, table and figures
    stats/quantization_stats.json       the quantization statistics
    data/<class>.parquet                the parquet export, when there is one

Uploads are incremental and resumable with huggingface_hub's own machinery: the remote tree is
listed, every file whose content is already there (same LFS sha256 or git blob id) is skipped, and
the rest goes up in commits of at most ``files_per_commit`` files, each pre-uploaded with
``preupload_lfs_files`` (the LFS batch API does not send an object the Hub already stores, so a
killed upload re-run sends only what is missing) then committed with ``create_commit``. Shards go
first; the root ``index.json``, ``build.json``, the card and the deletion of files no longer named
(older versions of a class) go in the last commit, so at every commit the repository's index names
only shards that are there. Nothing changed means no commit at all.

The HTTP requests of an upload (see ``hub_requests``) never wait forever: each one is given up after
``timeout`` seconds of silence from the Hub (``HubTimeout`` says what was being done). Credentials in
the endpoint (``HF_ENDPOINT=http://user:password@host``, a Hub behind basic auth) are sent as basic
auth, as requests does with such URLs, but never appear in a URL the client builds, reports or
raises: the upload works with them and nothing it prints or records carries them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.common.files import atomic_write_json, file_sha256
from imagenet_int8_assets.core.common.urls import redact_url

REPO_TYPE = "dataset"
MAX_FILES_PER_FOLDER = 10_000  # the Hub refuses more entries in one folder
DEFAULT_FILES_PER_COMMIT = 100  # the Hub recommends commits of at most a few hundred files
CARD = "README.md"
REPORT_FOLDER = "report"
STATS_FILE = "stats/quantization_stats.json"
PARQUET_FOLDER = "data"
FINAL_FILES = (mds_index.INDEX, mds_index.BUILD_INFO, CARD)  # committed last: they name everything else
# Remote paths this tool owns: files there that the layout no longer names are deleted. Anything
# else a user added to the repository (.gitattributes, their own files) is left alone.
MANAGED_FOLDERS = (mds_index.CLASSES, REPORT_FOLDER, "stats", PARQUET_FOLDER)
REPORT_SUFFIXES = (".json", ".csv", ".md", ".png", ".html")
HASH_CACHE = ".hub-hashes.json"
# Seconds of silence from the Hub after which a request is given up. A read timeout bounds the wait
# for the next bytes, not a whole transfer, so large uploads are not cut; 300 s also covers the Hub
# answering a commit of many large LFS files, which it verifies before it answers.
DEFAULT_TIMEOUT = 300


class PublishError(ValueError):
    """The dataset cannot be published as it is; the message says why and what to do."""


class HubTimeout(Exception):
    """The Hub did not answer a request of the upload for ``seconds`` while it was ``doing`` something.

    ``endpoint`` is shown without credentials. What was committed before stays committed and LFS
    content that reached the Hub is not sent again, so re-running the upload resumes it.
    """

    def __init__(self, endpoint: str, seconds: float, doing: str):
        self.endpoint, self.seconds, self.doing = redact_url(endpoint), seconds, doing
        super().__init__(f"the Hub at {self.endpoint} did not answer for {seconds:g} s while {doing}")


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its user-info, and the (user, password) requests would send as basic auth
    for it (None when it has none: requests sends nothing for a user without a password either)."""
    from requests.utils import get_auth_from_url

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    clean = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    auth = get_auth_from_url(url)
    return clean, (auth if any(auth) else None)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


@contextlib.contextmanager
def hub_requests(endpoint: str, timeout: float | None = DEFAULT_TIMEOUT) -> Iterator[str]:
    """huggingface_hub's HTTP requests in the block (every thread) never wait forever, and the
    endpoint's credentials are sent without being in any URL; yields ``endpoint`` without them.

    Through ``configure_http_backend`` (the client's hook for its sessions; the factory in place is
    kept and wrapped): a request made without a timeout of its own gets ``timeout`` seconds, for
    connecting and for each wait for the server's next bytes (None: no limit); a request to the
    endpoint's origin gets the credentials of its user-info as basic auth, as requests does for a
    URL holding them. huggingface_hub refuses URLs with "@" where it parses repository URLs (every
    ``create_commit`` answer, against ``constants.ENDPOINT``), so ``constants.ENDPOINT`` is cleaned of
    credentials for the block as well. Everything is restored when the block ends.
    """
    import requests
    from huggingface_hub import configure_http_backend, constants
    from huggingface_hub.utils import _http
    from requests.auth import HTTPBasicAuth

    clean, auth = split_credentials(endpoint)
    credentials: dict[str, tuple[str, str]] = {}
    if auth is not None:
        credentials[_origin(clean)] = auth
    default_endpoint = constants.ENDPOINT
    clean_default, default_auth = split_credentials(default_endpoint)
    if default_auth is not None:
        credentials.setdefault(_origin(clean_default), default_auth)
    previous = getattr(_http, "_GLOBAL_BACKEND_FACTORY", _http._default_backend_factory)

    def factory() -> requests.Session:
        session = previous()
        send = session.send

        def send_bounded(request, **kwargs):
            if kwargs.get("timeout") is None and timeout is not None:
                kwargs["timeout"] = timeout
            auth = credentials.get(_origin(request.url))
            if auth is not None:
                HTTPBasicAuth(*auth)(request)
            return send(request, **kwargs)

        session.send = send_bounded  # also used for redirects, which requests re-authenticates
        return session

    configure_http_backend(backend_factory=factory)
    constants.ENDPOINT = clean_default
    try:
        yield clean
    finally:
        constants.ENDPOINT = default_endpoint
        configure_http_backend(backend_factory=previous)


def timed_out(exc: BaseException) -> bool:
    """Whether a request timeout is the cause of ``exc``: requests' Timeout, or a socket timeout
    wrapped by urllib3 and requests (a send that blocked) or by huggingface_hub (an LFS upload's
    RuntimeError), anywhere in its chain."""
    import requests

    seen, todo = set(), [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (requests.Timeout, TimeoutError)):
            return True
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo += [e for e in linked if isinstance(e, BaseException)]
    return False


def repository_layout(
    mds_root: str | os.PathLike,
    *,
    card: str | os.PathLike,
    report: str | os.PathLike | None = None,
    stats: str | os.PathLike | None = None,
    parquet: dict[str, str | os.PathLike] | None = None,
) -> dict[str, Path]:
    """Path in the repository -> local file, for the dataset published at ``mds_root``.

    Only the shard folders named by the published ``index.json`` are included (not older class
    versions). ``report`` is the report folder (its summary, table and figures), ``stats`` the
    quantization statistics file, ``parquet`` maps file names under ``data/`` to local files.
    """
    root = Path(mds_root)
    index = mds_index.read_published_index(root)
    if index is None:
        raise PublishError(f"no published dataset at {root} (index.json missing): build it first (materialize mds_dataset)")
    layout: dict[str, Path] = {name: root / name for name in (mds_index.INDEX, mds_index.BUILD_INFO)}
    folders = sorted({str(PurePosixPath(shard["raw_data"]["basename"]).parent) for shard in index["shards"]})
    for folder in folders:
        local = root / folder
        if folder == "." or not local.is_dir():
            raise PublishError(f"index.json names shards in {folder!r}, which is not a class version folder under {root}")
        for path in sorted(local.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                layout[f"{folder}/{path.name}"] = path
    for shard in index["shards"]:
        if shard["raw_data"]["basename"] not in layout:
            raise PublishError(f"shard {shard['raw_data']['basename']} named by {root / mds_index.INDEX} is missing")
    layout[CARD] = Path(card)
    if report is not None and Path(report).is_dir():
        for path in sorted(Path(report).iterdir()):
            if path.is_file() and path.suffix in REPORT_SUFFIXES and not path.name.startswith("."):
                layout[f"{REPORT_FOLDER}/{path.name}"] = path
    if stats is not None and Path(stats).is_file():
        layout[STATS_FILE] = Path(stats)
    for name, path in sorted((parquet or {}).items()):
        layout[f"{PARQUET_FOLDER}/{name}"] = Path(path)
    check_folder_sizes(layout)
    return layout


def check_folder_sizes(paths) -> None:
    """Refuse a layout with a folder holding more entries than the Hub accepts."""
    entries: dict[str, set[str]] = {}
    for path in paths:
        parts = PurePosixPath(path).parts
        for depth in range(len(parts)):
            entries.setdefault("/".join(parts[:depth]) or ".", set()).add(parts[depth])
    crowded = {folder: len(names) for folder, names in entries.items() if len(names) > MAX_FILES_PER_FOLDER}
    if crowded:
        folder, count = max(crowded.items(), key=lambda item: item[1])
        raise PublishError(
            f"the repository folder {folder!r} would hold {count} entries; the Hub accepts at most "
            f"{MAX_FILES_PER_FOLDER} per folder. Publish fewer classes per repository."
        )


def git_blob_id(path: str | os.PathLike) -> str:
    """The git blob id (sha1 of ``blob <size>\\0<content>``) the Hub reports for a regular file."""
    digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """sha256 of local files, remembered by (path, size, mtime) in a JSON file (shards never change,
    so a re-publish of a 5 GB dataset hashes only what is new)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, list] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache is only a lost shortcut

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        entry = self.entries.get(key)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        digest = file_sha256(path)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, digest]
        return digest

    def save(self) -> None:
        if self.path is not None:
            live = {k: v for k, v in self.entries.items() if Path(k).exists()}
            atomic_write_json(self.path, live)


@dataclass(frozen=True)
class RemoteFile:
    size: int
    blob_id: str
    sha256: str | None  # set for LFS files


def remote_files(api, repo_id: str, revision: str) -> dict[str, RemoteFile]:
    """Every file of the repository at ``revision``: size, git blob id and LFS sha256."""
    from huggingface_hub.hf_api import RepoFile

    files = {}
    for entry in api.list_repo_tree(repo_id, repo_type=REPO_TYPE, revision=revision, recursive=True):
        if isinstance(entry, RepoFile):
            sha = entry.lfs.sha256 if entry.lfs is not None else None
            files[entry.path] = RemoteFile(entry.size, entry.blob_id, sha)
    return files


def _is_managed(path: str) -> bool:
    return path in FINAL_FILES or PurePosixPath(path).parts[0] in MANAGED_FOLDERS


@dataclass
class UploadPlan:
    add: list[str]  # paths whose content differs from (or is missing in) the repository
    unchanged: list[str]
    delete: list[str]  # managed remote paths the layout no longer names
    sizes: dict[str, int]

    @property
    def empty(self) -> bool:
        return not self.add and not self.delete

    def bytes_of(self, paths) -> int:
        return sum(self.sizes[p] for p in paths)


def plan_upload(layout: dict[str, Path], remote: dict[str, RemoteFile], hashes: HashCache) -> UploadPlan:
    """What to send: a file is unchanged when the remote one has its size and its LFS sha256 (or,
    for a regular file, its git blob id)."""
    add, unchanged, sizes = [], [], {}
    for path, local in layout.items():
        if not local.is_file():
            raise PublishError(f"{local} (for {path} in the repository) is missing: rebuild the dataset, then publish again")
        size = sizes[path] = local.stat().st_size
        theirs = remote.get(path)
        same = theirs is not None and theirs.size == size and (
            theirs.sha256 == hashes.sha256(local) if theirs.sha256 else theirs.blob_id == git_blob_id(local)
        )
        (unchanged if same else add).append(path)
    delete = sorted(p for p in remote if p not in layout and _is_managed(p))
    return UploadPlan(add, unchanged, delete, sizes)


@dataclass
class UploadResult:
    repo_id: str
    revision: str
    url: str
    created: bool  # the repository did not exist before
    private: bool | None
    commits: list[str] = field(default_factory=list)
    files_sent: int = 0  # files whose content went up in this run
    bytes_sent: int = 0
    files_resumed: int = 0  # LFS content a killed earlier upload had already sent (not sent again)
    bytes_resumed: int = 0
    files_skipped: int = 0  # already in the repository with the same content
    bytes_skipped: int = 0
    deleted: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.commits:
            return f"{self.url}: up to date, nothing sent ({self.files_skipped} files already there)"
        return (
            f"{self.url}: {len(self.commits)} commit(s); sent {self.files_sent} files ({self.bytes_sent} bytes), "
            f"{self.files_resumed} already uploaded by an earlier attempt, {self.files_skipped} unchanged, "
            f"{len(self.deleted)} deleted"
        )


class _AlreadyUploaded(logging.Handler):
    """Collects the files huggingface_hub's LFS upload reports as already present upstream."""

    MARK = "is already present upstream"

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.paths: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.MARK in message and message.startswith("Content of file "):
            self.paths.append(message.removeprefix("Content of file ").split(f" {self.MARK}")[0])


def _batches(paths: list[str], size: int) -> list[list[str]]:
    return [paths[i : i + size] for i in range(0, len(paths), size)]


@dataclass
class _Step:
    doing: str  # what the upload is doing, for HubTimeout's message


def upload_dataset(
    api,
    repo_id: str,
    layout: dict[str, Path],
    *,
    revision: str = "main",
    private: bool = True,
    message: str = "Publish the dataset",
    files_per_commit: int = DEFAULT_FILES_PER_COMMIT,
    hash_cache: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda _: None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> UploadResult:
    """Create the repository (and branch) when needed and bring it to ``layout``; see the module doc.

    Every request is bounded by ``timeout`` seconds of silence (``hub_requests``): a Hub that stops
    answering raises ``HubTimeout`` naming what was being done. ``api`` is not modified.
    """
    if files_per_commit < 1:
        raise PublishError(f"files_per_commit={files_per_commit}: use a positive number of files")
    step = _Step(f"reading the repository {repo_id}")
    try:
        with hub_requests(api.endpoint, timeout) as endpoint:
            client = copy.copy(api)
            client.endpoint = endpoint  # the credentials, if any, go as basic auth, never in a URL
            return _upload(
                client, repo_id, layout, step, revision=revision, private=private, message=message,
                files_per_commit=files_per_commit, hash_cache=hash_cache, log=log,
            )
    except Exception as exc:
        if timeout is not None and timed_out(exc):
            raise HubTimeout(api.endpoint, timeout, step.doing) from None
        raise


def _upload(
    api, repo_id: str, layout: dict[str, Path], step: _Step, *, revision: str, private: bool, message: str,
    files_per_commit: int, hash_cache: str | os.PathLike | None, log: Callable[[str], None],
) -> UploadResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.repo_info(repo_id, repo_type=REPO_TYPE)
        created = False
    except RepositoryNotFoundError:
        step.doing = f"creating the repository {repo_id}"
        api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
        info = api.repo_info(repo_id, repo_type=REPO_TYPE)
        created = True
    if revision != "main":
        step.doing = f"creating the branch {revision} of {repo_id}"
        api.create_branch(repo_id, repo_type=REPO_TYPE, branch=revision, exist_ok=True)
    url = f"{api.endpoint}/datasets/{repo_id}" + ("" if revision == "main" else f"/tree/{revision}")
    result = UploadResult(repo_id, revision, url, created, getattr(info, "private", None))
    hashes = HashCache(hash_cache)
    step.doing = f"listing the files of {repo_id}@{revision}"
    plan = plan_upload(layout, remote_files(api, repo_id, revision), hashes)
    hashes.save()
    result.files_skipped, result.bytes_skipped = len(plan.unchanged), plan.bytes_of(plan.unchanged)
    if plan.empty:
        log(result.summary())
        return result
    first = [p for p in plan.add if p not in FINAL_FILES]
    last = [p for p in plan.add if p in FINAL_FILES]
    batches = _batches(first, files_per_commit) + [last]  # the final commit also holds the deletions
    watcher = _AlreadyUploaded()
    lfs_logger = logging.getLogger("huggingface_hub._commit_api")
    level, propagate = lfs_logger.level, lfs_logger.propagate
    lfs_logger.addHandler(watcher)
    lfs_logger.setLevel(logging.DEBUG)
    lfs_logger.propagate = False  # the debug lines are counted here, not printed
    try:
        for n, batch in enumerate(batches, 1):
            deletes = plan.delete if n == len(batches) else []
            if not batch and not deletes:
                continue
            additions = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(layout[p])) for p in batch]
            operations = [*additions, *(CommitOperationDelete(path_in_repo=p) for p in deletes)]
            before = len(watcher.paths)
            if additions:
                step.doing = f"uploading the {len(additions)} file(s) of commit {n}/{len(batches)}"
                api.preupload_lfs_files(repo_id, additions, repo_type=REPO_TYPE, revision=revision)
            title = message if len(batches) == 1 else f"{message} ({n}/{len(batches)})"
            step.doing = f"committing {n}/{len(batches)} ({len(batch)} file(s) added, {len(deletes)} deleted)"
            commit = api.create_commit(
                repo_id, operations, commit_message=title, repo_type=REPO_TYPE, revision=revision
            )
            result.commits.append(commit.oid)
            resumed = set(watcher.paths[before:])
            for p in batch:
                if p in resumed:
                    result.files_resumed += 1
                    result.bytes_resumed += plan.sizes[p]
                else:
                    result.files_sent += 1
                    result.bytes_sent += plan.sizes[p]
            result.added += batch
            result.deleted += deletes
            log(f"commit {n}/{len(batches)} {commit.oid[:12]}: {len(batch)} file(s) added, {len(deletes)} deleted")
    finally:
        lfs_logger.removeHandler(watcher)
        lfs_logger.setLevel(level)
        lfs_logger.propagate = propagate
    log(result.summary())
    return result


def folder_counts(paths) -> Counter:
    """Files per top-level repository folder (for metadata)."""
    return Counter(PurePosixPath(p).parts[0] if len(PurePosixPath(p).parts) > 1 else "." for p in paths)
