"""The published dataset on object storage: an S3-compatible bucket mirrors ``<output>/mds``.

Runs on several machines share their working files (manifest, crops, latents) through the output
folder (a shared file system); the dataset that trainers stream is mirrored to a bucket
(``s3://bucket/prefix``, any S3-compatible store: the endpoint comes from ``S3_ENDPOINT_URL``,
the variable mosaicml-streaming's reader uses too, credentials from boto3's usual chain).

The mirror keeps the local layout's guarantees (``core.mds_index``):

* A class version (``classes/<class-dir>/<version>/``) is written once and never modified: each of
  its files is created with ``If-None-Match: *``, so no upload ever replaces an object. A file
  already there with the same size is a re-run's or a sibling run's upload and is kept.
* ``index.json`` is published last, and only after every file it names has been listed in the
  bucket with the size the index records. An S3 PUT is atomic, so a reader sees the old index or
  the new one, never a partial one. The index it replaces is kept as ``.previous-index.json``.
* A run killed at any moment leaves at most unreferenced version files, which the next
  publication completes or removes; never a published index naming a missing shard.

No Dagster import; boto3 comes with mosaicml-streaming.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from imagenet_int8_assets.core.mds_index import BUILD_INFO, CLASSES, INDEX, PREVIOUS_INDEX

SCHEME = "s3://"
ENDPOINT_VAR = "S3_ENDPOINT_URL"
# inside a version folder the shards go first and the files that describe them last
LAST_IN_VERSION = (INDEX, BUILD_INFO)


class RemoteError(RuntimeError):
    """The bucket cannot be used, or holds something that contradicts the local dataset."""


def check_remote_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket[/prefix]``; ValueError naming what is wrong."""
    if not url.startswith(SCHEME):
        raise ValueError(f"{url!r} is not an s3:// URL: use s3://bucket/prefix (any S3-compatible store; set "
                         f"{ENDPOINT_VAR} for one that is not AWS).")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket: use s3://bucket/prefix.")
    return bucket, prefix.strip("/")


@dataclass
class MirrorResult:
    uploaded: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    present: int = 0  # files already in the bucket with the right size
    published: bool = False  # index.json replaced (False: the bucket already had this index)
    removed: list[str] = field(default_factory=list)

    def add(self, other: MirrorResult) -> None:
        self.uploaded += other.uploaded
        self.uploaded_bytes += other.uploaded_bytes
        self.present += other.present


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class RemoteMds:
    """One dataset root in a bucket: ``s3://bucket/prefix`` holds what ``<output>/mds`` holds."""

    def __init__(self, url: str, client=None):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = check_remote_url(url)
        if client is None:
            import boto3

            client = boto3.session.Session().client("s3", endpoint_url=os.environ.get(ENDPOINT_VAR) or None)
        self.client = client

    # ---- objects -------------------------------------------------------------------------

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _fail(self, what: str, exc: Exception) -> RemoteError:
        endpoint = os.environ.get(ENDPOINT_VAR) or "AWS (no S3_ENDPOINT_URL set)"
        return RemoteError(
            f"{what} on {self.url} failed ({type(exc).__name__}: {exc}). Check that the bucket exists, that the "
            f"credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile) may read and write it, and the "
            f"endpoint ({endpoint}); then re-run: finished uploads are kept."
        )

    def list_sizes(self, relative_prefix: str = "") -> dict[str, int]:
        """``{path relative to the root: size}`` of every object under ``relative_prefix``."""
        start = self.key(relative_prefix) if relative_prefix else (f"{self.prefix}/" if self.prefix else "")
        cut = len(self.prefix) + 1 if self.prefix else 0
        out = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    out[item["Key"][cut:]] = int(item["Size"])
        except Exception as exc:  # botocore's errors: no bucket, no access, no endpoint
            raise self._fail("Listing", exc) from exc
        return out

    def read(self, relative: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(relative))["Body"].read()
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise self._fail(f"Reading {relative}", exc) from exc

    def write(self, relative: str, body: bytes) -> None:
        """Create or replace one object (the index files)."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(relative), Body=body)
        except Exception as exc:
            raise self._fail(f"Writing {relative}", exc) from exc

    def create(self, relative: str, path: Path, size: int) -> bool:
        """Upload ``path`` as a new object; never replaces one. True when it uploaded, False when an
        object of the same size was already there (another run's upload of the same version)."""
        try:
            with open(path, "rb") as body:
                self.client.put_object(Bucket=self.bucket, Key=self.key(relative), Body=body, IfNoneMatch="*")
            return True
        except Exception as exc:
            if _error_code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise self._fail(f"Uploading {relative}", exc) from exc
        there = self.list_sizes(relative).get(relative)
        if there != size:
            raise RemoteError(
                f"{self.url}/{relative} exists with {there} bytes, the local file {path} has {size}. Version folders "
                "are named after their content and never change, so the bucket's copy is damaged or was written by "
                "something else: delete that object and re-run."
            )
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
        self, root: str | os.PathLike, folder: str | os.PathLike, listed: dict[str, int] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> MirrorResult:
        """Upload one class version folder (``root/classes/<class>/<version>``): shards first, its
        index.json and build.json last. Files already in the bucket with their size are skipped."""
        root, folder = Path(root), Path(folder)
        relative_folder = folder.relative_to(root).as_posix()
        if listed is None:
            listed = self.list_sizes(relative_folder + "/")
        last = {name: rank for rank, name in enumerate(LAST_IN_VERSION, start=1)}
        files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: (last.get(p.name, 0), p.name))
        result = MirrorResult()
        for path in files:
            relative, size = f"{relative_folder}/{path.name}", path.stat().st_size
            if listed.get(relative) == size:
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

    def publish(self, root: str | os.PathLike, progress: Callable[[str], None] | None = None) -> MirrorResult:
        """Mirror the locally published dataset (``root/index.json``) to the bucket.

        Uploads every version folder the index names that the bucket lacks, lists the bucket and
        checks every shard the index names is there with its recorded size, then replaces the
        bucket's index.json (the one it replaces becomes .previous-index.json) and build.json.
        Finally removes version folders from the bucket that neither its index, its previous index,
        nor the local root (which keeps each class's current version) has.
        """
        root = Path(root)
        body = (root / INDEX).read_bytes()
        index = json.loads(body)
        versions = sorted(_version_folders(index))
        listed = self.list_sizes(CLASSES + "/")
        result = MirrorResult()
        for relative in versions:
            if not (root / relative).is_dir():
                raise RemoteError(f"The published index names {relative}, which is not in {root}: re-materialize "
                                  "mds_dataset (it re-publishes from the current class versions).")
            result.add(self.mirror_version(root, root / relative, listed, progress))
        missing = _missing_shards(index, self.list_sizes(CLASSES + "/"))
        if missing:
            raise RemoteError(
                f"{len(missing)} shard(s) the index names are not in {self.url} with their recorded size after the "
                f"upload ({', '.join(missing[:5])}); the bucket's index.json was left unchanged. Re-run mds_dataset."
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


def _version_folders(index: dict) -> set[str]:
    out = set()
    for shard in index.get("shards", []):
        for key in ("raw_data", "zip_data"):
            if shard.get(key):
                out.add(PurePosixPath(shard[key]["basename"]).parent.as_posix())
    return out


def _missing_shards(index: dict, listed: dict[str, int]) -> list[str]:
    missing = []
    for shard in index.get("shards", []):
        for key in ("raw_data", "zip_data"):
            entry = shard.get(key)
            if entry and listed.get(entry["basename"]) != entry["bytes"]:
                missing.append(entry["basename"])
    return missing
