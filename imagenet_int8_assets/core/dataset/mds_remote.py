"""The published dataset on object storage: an S3-compatible bucket mirrors ``<output>/mds``.

Runs on several machines share their working files (manifest, crops, latents) through the output
folder (a shared file system); the dataset that trainers stream is mirrored to a bucket
(``s3://bucket/prefix``, any S3-compatible store: the endpoint comes from ``S3_ENDPOINT_URL``,
the variable mosaicml-streaming's reader uses too, credentials from boto3's usual chain; never
inside the URL, which is printed and recorded: ``check_remote_url`` refuses that).

The mirror holds exactly the local dataset, and keeps the local layout's guarantees (``core.dataset.mds_index``):

* Objects are compared by content, not size. A single-part PUT gives an ETag equal to the MD5 of
  the body (AWS, MinIO, moto...), and ``list_objects_v2`` returns every object's ETag with no extra
  request: it is compared with the local file's MD5 (computed once per file and instance). Where
  the ETag is not the MD5 (multipart uploads: ``<hex>-<parts>``; some server-side encryption) or
  differs, the object is read back and its MD5 compared before anything is decided.
* A class version (``classes/<class-dir>/<version>/``) is written once and never modified: each of
  its files is created with ``If-None-Match: *`` (and ``Content-MD5``, so the store checks the body
  it received), so no upload ever replaces an object. A file already there with the same content is
  a re-run's or a sibling run's upload and is kept; one with other content stops the run, naming the
  object to delete.
* ``index.json`` is published last, and only after every file of every version it names has been
  listed in the bucket with the content of the local file. An S3 PUT is atomic, so a reader sees the
  old index or the new one, never a partial one. The index it replaces is kept as ``.previous-index.json``.
* A run killed at any moment leaves at most unreferenced version files, which the next
  publication completes or removes; never a published index naming a missing or different shard.

URLs are shown through ``core.common.urls.redact_url`` (the endpoint may carry credentials). No Dagster
import; boto3 comes with mosaicml-streaming.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from imagenet_int8_assets.core.dataset.mds_index import BUILD_INFO, CLASSES, INDEX, PREVIOUS_INDEX
from imagenet_int8_assets.core.common.files import file_hash
from imagenet_int8_assets.core.common.urls import has_credentials, redact_url, redact_urls

SCHEME = "s3://"
ENDPOINT_VAR = "S3_ENDPOINT_URL"
# inside a version folder the shards go first and the files that describe them last
LAST_IN_VERSION = (INDEX, BUILD_INFO)
# check_bucket must fail in seconds on an endpoint that does not answer: short timeouts, one retry
# (botocore's defaults, 60 s timeouts and 5 attempts, take minutes on a black-holed address)
PROBE_TIMEOUTS = {"connect_timeout": 3, "read_timeout": 5, "retries": {"total_max_attempts": 2, "mode": "standard"}}


class RemoteError(RuntimeError):
    """The bucket cannot be used, or holds something that contradicts the local dataset."""


def check_remote_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket[/prefix]``; ValueError naming what is wrong.

    Credentials inside the URL are refused: the URL is a setting, which is printed and stored in
    the Dagster instance with the resource's config; the message shows it redacted."""
    shown = redact_url(url)
    if has_credentials(url):
        raise ValueError(
            f"{shown!r}: credentials do not belong in the URL (it is printed and stored with the run's config): use "
            "s3://bucket/prefix and put them in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile (AWS_PROFILE)."
        )
    if not url.startswith(SCHEME):
        raise ValueError(f"{shown!r} is not an s3:// URL: use s3://bucket/prefix (any S3-compatible store; set "
                         f"{ENDPOINT_VAR} for one that is not AWS).")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{shown!r} names no bucket: use s3://bucket/prefix.")
    return bucket, prefix.strip("/")


@dataclass(frozen=True)
class RemoteObject:
    """One object as ``list_objects_v2`` describes it."""

    size: int
    etag: str  # quotes removed; the body's MD5 (hex) for a single-part upload without SSE-KMS/SSE-C


@dataclass
class MirrorResult:
    uploaded: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    present: int = 0  # files already in the bucket with the local file's content
    published: bool = False  # index.json replaced (False: the bucket already had this index)
    removed: list[str] = field(default_factory=list)

    def add(self, other: MirrorResult) -> None:
        self.uploaded += other.uploaded
        self.uploaded_bytes += other.uploaded_bytes
        self.present += other.present


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _client(config: dict | None = None):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=os.environ.get(ENDPOINT_VAR) or None, config=Config(**config) if config else None
    )


class RemoteMds:
    """One dataset root in a bucket: ``s3://bucket/prefix`` holds what ``<output>/mds`` holds.

    ``client`` (tests) replaces both boto3 clients: the one for transfers (botocore's defaults) and
    the one ``check_bucket`` uses (``PROBE_TIMEOUTS``)."""

    def __init__(self, url: str, client=None):
        self.url = url.rstrip("/")  # check_remote_url refuses credentials: safe to show as is
        self.bucket, self.prefix = check_remote_url(url)
        try:
            self.client = client or _client()
            self.probe_client = client or _client(PROBE_TIMEOUTS)
        except Exception as exc:  # botocore refuses the endpoint URL, or finds no region for AWS
            endpoint = redact_url(os.environ.get(ENDPOINT_VAR) or "") or "not set"
            raise RemoteError(
                f"No S3 client for {self.url} ({redact_urls(f'{type(exc).__name__}: {exc}')}): check {ENDPOINT_VAR} "
                f"({endpoint}) and AWS_DEFAULT_REGION."
            ) from exc
        self._local_md5: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> MD5 hex
        self._read_md5: dict[tuple[str, str], str | None] = {}  # (relative, ETag) -> MD5 of the body read back

    # ---- objects -------------------------------------------------------------------------

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def endpoint(self) -> str:
        """The endpoint the client calls, without credentials (S3_ENDPOINT_URL may carry some)."""
        url = redact_url(str(self.client.meta.endpoint_url))
        return url if os.environ.get(ENDPOINT_VAR) else f"{url} (AWS: {ENDPOINT_VAR} is not set)"

    def _fail(self, what: str, exc: Exception) -> RemoteError:
        return RemoteError(
            f"{what} on {self.url} failed ({redact_urls(f'{type(exc).__name__}: {exc}')}). Check that the bucket "
            f"exists, that the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile) may read and write "
            f"it, and the endpoint {self.endpoint()}; then re-run: finished uploads are kept."
        )

    def check_bucket(self) -> None:
        """Whether the bucket can be used, in seconds, before any work: ``head_bucket`` then one
        listing of the prefix (one key at most), with short timeouts and one retry. RemoteError
        naming the bucket, the endpoint and what to do."""
        try:
            self.probe_client.head_bucket(Bucket=self.bucket)
            self.probe_client.list_objects_v2(Bucket=self.bucket, Prefix=self.key(""), MaxKeys=1)
        except Exception as exc:
            code = _error_code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                what, todo = "does not exist", "create it (or fix the bucket name)"
            elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
                what = "refuses these credentials"
                todo = "set credentials that may list and write it (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile)"
            else:
                what, todo = "cannot be reached", f"check the endpoint ({ENDPOINT_VAR}) and the network"
            raise RemoteError(
                f"bucket {self.bucket!r} {what} at {self.endpoint()} ({redact_urls(f'{type(exc).__name__}: {exc}')}): "
                f"{todo}, or set no mirror to keep the dataset local only"
            ) from exc

    def list_objects(self, relative_prefix: str = "") -> dict[str, RemoteObject]:
        """``{path relative to the root: RemoteObject}`` of every object under ``relative_prefix``."""
        start = self.key(relative_prefix) if relative_prefix else (f"{self.prefix}/" if self.prefix else "")
        cut = len(self.prefix) + 1 if self.prefix else 0
        out = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    out[item["Key"][cut:]] = RemoteObject(int(item["Size"]), str(item.get("ETag", "")).strip('"'))
        except Exception as exc:  # botocore's errors: no bucket, no access, no endpoint
            raise self._fail("Listing", exc) from exc
        return out

    def list_sizes(self, relative_prefix: str = "") -> dict[str, int]:
        """``{path relative to the root: size}`` of every object under ``relative_prefix``."""
        return {relative: obj.size for relative, obj in self.list_objects(relative_prefix).items()}

    def read(self, relative: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(relative))["Body"].read()
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise self._fail(f"Reading {relative}", exc) from exc

    def holds_index(self, root: str | os.PathLike) -> bool:
        """Whether the bucket's index.json is byte for byte ``root``'s (one GET): the bucket then
        serves the locally published dataset (``publish`` writes it only after checking every file)."""
        local = Path(root) / INDEX
        return local.is_file() and self.read(INDEX) == local.read_bytes()

    def write(self, relative: str, body: bytes) -> None:
        """Create or replace one object (the index files)."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(relative), Body=body)
        except Exception as exc:
            raise self._fail(f"Writing {relative}", exc) from exc

    # ---- content -------------------------------------------------------------------------

    def local_md5(self, path: Path) -> str:
        """MD5 (hex) of a local file, computed once per (path, size, mtime_ns) for this instance."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._local_md5:
            self._local_md5[key] = file_hash(path, "md5")
        return self._local_md5[key]

    def _object_md5(self, relative: str, etag: str) -> str | None:
        """MD5 of the object's body, read back (once per ETag); None when it is gone."""
        if (relative, etag) not in self._read_md5:
            digest = hashlib.md5()
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self.key(relative))["Body"]
                for chunk in iter(lambda: body.read(1 << 22), b""):
                    digest.update(chunk)
                self._read_md5[(relative, etag)] = digest.hexdigest()
            except Exception as exc:
                if _error_code(exc) not in ("NoSuchKey", "404"):
                    raise self._fail(f"Reading {relative}", exc) from exc
                self._read_md5[(relative, etag)] = None
        return self._read_md5[(relative, etag)]

    def same_content(self, relative: str, path: Path, there: RemoteObject) -> bool:
        """Whether the object ``relative`` (as listed: ``there``) holds exactly the bytes of ``path``.

        Sizes first; then the ETag against the local MD5 (a single-part upload's ETag is its MD5);
        any other ETag (multipart, server-side encryption, other bytes) is settled by reading the
        object back, so a store whose ETags are not MD5s costs a download, never a false alarm."""
        if there.size != path.stat().st_size:
            return False
        local = self.local_md5(path)
        return there.etag == local or self._object_md5(relative, there.etag) == local

    def _contradiction(self, relative: str, path: Path, there: RemoteObject | None) -> RemoteError:
        if there is None:  # If-None-Match refused, yet not listed: another upload in flight, or a deletion
            return RemoteError(
                f"{self.url}/{relative} could not be created (the store says it exists or is being written) and is not "
                "listed: another run may be uploading it; re-run when it is done (finished uploads are kept)."
            )
        size = path.stat().st_size
        if there.size != size:
            what = f"exists with {there.size} bytes, the local file {path} has {size}"
        else:
            what = f"exists with the size of the local file {path} ({size} bytes) but other content"
        return RemoteError(
            f"{self.url}/{relative} {what}. Version folders are named after their content and never change, so the "
            "bucket's copy is damaged or was written by something else: delete that object and re-run."
        )

    def create(self, relative: str, path: Path, size: int) -> bool:
        """Upload ``path`` as a new object; never replaces one. True when it uploaded, False when an
        object with the same content was already there (another run's upload of the same version);
        RemoteError when the object there has other content."""
        md5 = self.local_md5(path)
        try:
            with open(path, "rb") as body:
                self.client.put_object(
                    Bucket=self.bucket, Key=self.key(relative), Body=body, IfNoneMatch="*",
                    ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode(),
                )
            return True
        except Exception as exc:
            if _error_code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise self._fail(f"Uploading {relative}", exc) from exc
        there = self.list_objects(relative).get(relative)
        if there is None or not self.same_content(relative, path, there):
            raise self._contradiction(relative, path, there)
        return False

    def delete(self, relatives: list[str]) -> None:
        for start in range(0, len(relatives), 1000):
            chunk = relatives[start:start + 1000]
            try:
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": self.key(r)} for r in chunk], "Quiet": True}
                )
            except Exception as exc:
                raise self._fail("Deleting unreferenced versions", exc) from exc

    # ---- the dataset ---------------------------------------------------------------------

    def mirror_version(
        self, root: str | os.PathLike, folder: str | os.PathLike, listed: dict[str, RemoteObject] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> MirrorResult:
        """Upload one class version folder (``root/classes/<class>/<version>``): shards first, its
        index.json and build.json last. Files already in the bucket with their content are skipped;
        one with other content raises RemoteError."""
        root, folder = Path(root), Path(folder)
        relative_folder = folder.relative_to(root).as_posix()
        if listed is None:
            listed = self.list_objects(relative_folder + "/")
        last = {name: rank for rank, name in enumerate(LAST_IN_VERSION, start=1)}
        files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: (last.get(p.name, 0), p.name))
        result = MirrorResult()
        for path in files:
            relative, size = f"{relative_folder}/{path.name}", path.stat().st_size
            there = listed.get(relative)
            if there is not None:
                if not self.same_content(relative, path, there):
                    raise self._contradiction(relative, path, there)
                result.present += 1
                continue
            if self.create(relative, path, size):
                result.uploaded.append(relative)
                result.uploaded_bytes += size
                if progress is not None:
                    progress(relative)
            else:
                result.present += 1
        return result

    def mirror_dataset(self, root: str | os.PathLike, progress: Callable[[str], None] | None = None) -> MirrorResult:
        """Mirror the locally published dataset (``root/index.json``) to the bucket.

        Uploads every version folder the index names that the bucket lacks, lists the bucket and
        checks that every file of those versions (every shard the index names among them) is there
        with the local file's content, then replaces the bucket's index.json (the one it replaces
        becomes .previous-index.json) and build.json. Finally removes version folders from the
        bucket that neither its index, its previous index, nor the local root (which keeps each
        class's current version) has.
        """
        root = Path(root)
        body = (root / INDEX).read_bytes()
        index = json.loads(body)
        versions = sorted(_version_folders(index))
        listed = self.list_objects(CLASSES + "/")
        result = MirrorResult()
        for relative in versions:
            if not (root / relative).is_dir():
                raise RemoteError(f"The published index names {relative}, which is not in {root}: re-materialize "
                                  "mds_dataset (it re-publishes from the current class versions).")
            result.add(self.mirror_version(root, root / relative, listed, progress))
        wrong = self._not_mirrored(root, index, versions, self.list_objects(CLASSES + "/"))
        if wrong:
            raise RemoteError(
                f"{len(wrong)} file(s) the index names are not in {self.url} with the local content after the upload "
                f"({', '.join(wrong[:5])}); the bucket's index.json was left unchanged. Delete those objects from the "
                "bucket (a version's files never change, so nothing else replaces them) and re-run mds_dataset."
            )
        old = self.read(INDEX)
        if old != body:
            if old is not None:
                self.write(PREVIOUS_INDEX, old)
            self.write(INDEX, body)
            result.published = True
        record = root / BUILD_INFO
        if record.is_file():
            data = record.read_bytes()
            if self.read(BUILD_INFO) != data:
                self.write(BUILD_INFO, data)
        result.removed = self.collect_garbage(root, index, old if result.published else self.read(PREVIOUS_INDEX))
        return result

    def _not_mirrored(
        self, root: Path, index: dict, versions: list[str], listed: dict[str, RemoteObject]
    ) -> list[str]:
        """The files of ``versions`` and the shards ``index`` names that the bucket lacks or holds
        with other content than ``root``'s (by content: sizes alone miss a same-length change)."""
        recorded = dict(_shard_files(index))  # relative path -> size the index records
        names = set(recorded)
        for relative in versions:
            names.update(f"{relative}/{p.name}" for p in (root / relative).iterdir() if p.is_file())
        wrong = []
        for relative in sorted(names):
            there, path = listed.get(relative), root / relative
            if (
                there is None or not path.is_file() or there.size != recorded.get(relative, there.size)
                or not self.same_content(relative, path, there)
            ):
                wrong.append(relative)
        return wrong

    def collect_garbage(self, root: Path, index: dict, previous: bytes | None) -> list[str]:
        """Delete version folders in the bucket that no index there refers to and that the local
        root no longer has (the local sweep keeps each class's current version, which a running
        class may be uploading)."""
        keep = _version_folders(index)
        if previous:
            try:
                keep |= _version_folders(json.loads(previous))
            except ValueError:
                pass
        doomed = []
        for relative in self.list_sizes(CLASSES + "/"):
            parts = PurePosixPath(relative).parts
            if len(parts) < 4 or not parts[2].startswith("v-"):
                continue
            version = "/".join(parts[:3])
            if version not in keep and not (root / version).is_dir():
                doomed.append(relative)
        self.delete(doomed)
        return sorted({"/".join(PurePosixPath(r).parts[:3]) for r in doomed})


def _shard_files(index: dict) -> list[tuple[str, int]]:
    """``(path relative to the root, recorded size)`` of every file (raw and compressed) the index's shards name."""
    return [
        (shard[key]["basename"], int(shard[key]["bytes"]))
        for shard in index.get("shards", []) for key in ("raw_data", "zip_data") if shard.get(key)
    ]


def _version_folders(index: dict) -> set[str]:
    return {PurePosixPath(name).parent.as_posix() for name, _ in _shard_files(index)}
