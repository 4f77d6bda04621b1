"""On-disk layout of the intermediate artifacts, and atomic writes.

Layout under the output root (``IMAGENET_INT8_OUTPUT``)::

    manifest/manifest.parquet        raw manifest (one row per source file)
    crops/<class>/images.npy         uint8 (N, S, S, 3) crops, C order, lossless
    crops/<class>/meta.json          {"ids": [...], "failed": [{"id", "reason"}], "recipe", "size"}
    latents/<class>/latents.npz      float32 mean, std, latent (N, C, h, w) and ids
    latents/<class>/meta.json        provenance (VAE, weights, device, latent value, seed, ...)
    stats/quantization_stats.json    per-channel statistics, overall and per class
    mds/classes/<class>/<version>/   one immutable build of one class: MDS shards, index.json, build.json
    mds/classes/<class>/current.json the version that the latest mds_shards run of the class wrote
    mds/index.json                   the published dataset: merged index over every class's version
    mds/build.json                   how the published dataset was built (also embedded in index.json)
    report/                          reconstruction report (PNG figures, report.html, metrics.csv)
    probe/                           latent probe (features.npz, figures, report.html)
    .imagenet-int8-build.lock        held by the running `imagenet-int8 build` (see ``build_lock``)

Every partition folder is written to a hidden sibling (``.tmp-<name>-<random>``) and swapped in
with renames, so a killed run never leaves a half-written folder under a real name; leftovers
are removed the next time that partition is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


def file_hash(path: str | os.PathLike, algo: str) -> str:
    """Hex digest of a file, read in 4 MiB blocks; ``algo`` is a hashlib name or an xxhash one
    (``xxh3_64``, ..., as MDS indexes record them)."""
    if algo.startswith("xxh"):
        import xxhash

        digest = getattr(xxhash, algo)()
    else:
        digest = hashlib.new(algo)
    buffer = bytearray(1 << 22)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file."""
    return file_hash(path, "sha256")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def remove_leftovers(parent: Path, name: str | None = None) -> list[Path]:
    """Delete temporary/trash siblings left by killed runs (for ``name``, or all of them)."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        for prefix in (TMP_PREFIX, TRASH_PREFIX):
            if entry.name.startswith(prefix) and (
                name is None or entry.name.startswith(f"{prefix}{name}-")
            ):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


@contextmanager
def staging_dir(parent: str | os.PathLike, name: str | None = None, clean_leftovers: bool = True) -> Iterator[Path]:
    """Yield a new hidden folder ``parent/.tmp-<name>-<random>`` (``.tmp-<random>`` without a name)
    to write into; whatever is still there when the block ends (an exception, or the caller did
    not move it into place) is deleted.

    ``clean_leftovers`` first removes the ``.tmp-``/``.trash-`` siblings that killed runs left
    (for ``name``; every one in ``parent`` without a name). Only writers that are alone in
    ``parent`` (one run per partition) may clean; a writer that can run concurrently with itself
    passes False, or it would delete the other's folder in progress.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    if clean_leftovers:
        remove_leftovers(parent, name)
    token = uuid.uuid4().hex[:8]
    tmp = parent / (f"{TMP_PREFIX}{name}-{token}" if name else f"{TMP_PREFIX}{token}")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename the finished folder ``staged`` to ``final``, replacing what is there as a whole.

    An existing ``final`` is first renamed to a ``.trash-`` sibling and deleted once the new one is
    in place; should that last rename fail, the old folder is put back, so ``final`` is always
    either the old folder or the new one. Both must be on the same file system (siblings are).
    """
    staged, final = Path(staged), Path(final)
    trash = final.parent / f"{TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(final, trash)
    except FileNotFoundError:
        trash = None
    try:
        os.rename(staged, final)
    except BaseException:
        if trash is not None and not final.exists():
            os.rename(trash, final)  # put the previous folder back
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


@contextmanager
def atomic_dir(final: str | os.PathLike, clean_leftovers: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``final`` as a whole.

    The one way every writer of a folder writes it (partitions, the report, the probe, CIFAR
    exports, the sample source): written aside in ``staging_dir``, swapped in by
    ``move_into_place``. On an exception the temporary folder is deleted and ``final`` is left as
    it was; a run killed mid-write leaves only hidden ``.tmp-``/``.trash-`` siblings, which the
    next write of ``final`` removes (unless ``clean_leftovers`` is False, see ``staging_dir``).
    """
    final = Path(final)
    with staging_dir(final.parent, final.name, clean_leftovers) as tmp:
        yield tmp
        move_into_place(tmp, final)


def write_folder(final: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Replace ``final`` with a folder holding exactly ``files`` (name -> bytes), via ``atomic_dir``."""
    with atomic_dir(final) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return Path(final)


# --------------------------------------------------------------------------------------------
# Paths


def manifest_path(output: str | os.PathLike) -> Path:
    return Path(output) / "manifest" / "manifest.parquet"


def source_classes_path(output: str | os.PathLike) -> Path:
    """Beside the manifest: the class folders, labels and versions of the last scan (``classes.json``)."""
    return manifest_path(output).with_name("classes.json")


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ +-]*")
_MAX_NAME = 120


def class_dir_name(class_name: str) -> str:
    """The on-disk folder name for a class: one path component that can never escape its parent
    or collide with the output's own files.

    Plain names (letters, digits, ``. _ + -`` and spaces, starting with a letter or digit, up to
    120 characters, as every ImageNet wnid and CIFAR-10 class) are used unchanged. Any other name
    is percent-encoded (UTF-8 bytes outside ``[A-Za-z0-9._-]`` become ``%XX``; a leading dot too),
    and an encoding longer than 120 characters is cut and completed with a hash of the name. A
    plain name never contains ``%`` and every encoded one does, so two classes never share a folder.
    """
    if not class_name or "\x00" in class_name:
        raise ValueError(f"invalid class name {class_name!r}")
    if _PLAIN_NAME.fullmatch(class_name) and len(class_name) <= _MAX_NAME and not class_name.endswith((" ", ".")):
        return class_name
    raw = class_name.encode("utf-8", "surrogateescape")
    encoded = "".join(
        chr(b) if (chr(b).isascii() and (chr(b).isalnum() or chr(b) in "_-" or (chr(b) == "." and i > 0))) else f"%{b:02X}"
        for i, b in enumerate(raw)
    )
    if "%" not in encoded or len(encoded) > _MAX_NAME:
        encoded = f"{encoded[: _MAX_NAME - 20]}%{hashlib.sha256(raw).hexdigest()[:16]}"
    return encoded


def crops_dir(output: str | os.PathLike, class_folder: str) -> Path:
    return Path(output) / "crops" / class_dir_name(class_folder)


def latents_dir(output: str | os.PathLike, class_folder: str) -> Path:
    return Path(output) / "latents" / class_dir_name(class_folder)


def stats_path(output: str | os.PathLike) -> Path:
    return Path(output) / "stats" / "quantization_stats.json"


def report_dir(output: str | os.PathLike) -> Path:
    return Path(output) / "report"


def probe_dir(output: str | os.PathLike) -> Path:
    return Path(output) / "probe"


def mds_root(output: str | os.PathLike) -> Path:
    return Path(output) / "mds"


class MissingArtifact(FileNotFoundError):
    """An upstream partition has not been materialized (or was written by another version)."""


def _read_meta(folder: Path, what: str, asset: str) -> dict:
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        raise MissingArtifact(
            f"No {what} at {str(folder)!r}. Materialize the {asset!r} asset for this partition "
            "first (or run `imagenet-int8 build`)."
        )
    return json.loads(meta_file.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Crops


def write_crops(
    output: str | os.PathLike,
    class_folder: str,
    ids: list[str],
    images: np.ndarray,
    meta: dict,
) -> Path:
    """Store one class's crops atomically. ``images`` is uint8 (N, S, S, 3)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] != len(ids):
        raise ValueError(f"crops must be (N, S, S, 3) with N == len(ids); got {images.shape}")
    final = crops_dir(output, class_folder)
    with atomic_dir(final) as tmp:
        np.save(tmp / "images.npy", images, allow_pickle=False)
        atomic_write_json(tmp / "meta.json", {**meta, "ids": list(ids), "count": len(ids)})
    return final


def read_crops(
    output: str | os.PathLike, class_folder: str, mmap: bool = False
) -> tuple[list[str], np.ndarray]:
    """One class's crops: (ids, uint8 array N x S x S x 3), rows in the order of ``ids``.

    ``mmap=True`` maps the file instead of reading it (for classes larger than memory).
    """
    ids, images, _ = read_crops_with_meta(output, class_folder, mmap=mmap)
    return ids, images


def read_crops_with_meta(
    output: str | os.PathLike, class_folder: str, mmap: bool = False
) -> tuple[list[str], np.ndarray, dict]:
    folder = crops_dir(output, class_folder)
    meta = _read_meta(folder, "crops", "preprocessed_crops")
    # numpy cannot map a zero-length array: read empty classes normally
    use_mmap = mmap and meta.get("count", 1) > 0
    images = np.load(folder / "images.npy", mmap_mode="r" if use_mmap else None, allow_pickle=False)
    ids = list(meta["ids"])
    if images.shape[0] != len(ids):
        raise MissingArtifact(f"{folder}: {images.shape[0]} crops but {len(ids)} ids; re-materialize it")
    return ids, images, meta


# --------------------------------------------------------------------------------------------
# Latents


def write_latents(
    output: str | os.PathLike,
    class_folder: str,
    ids: list[str],
    arrays: dict[str, np.ndarray],
    meta: dict,
) -> Path:
    """Store one class's latents (float32 arrays keyed by name, first axis = image) atomically."""
    for name, arr in arrays.items():
        if arr.shape[0] != len(ids):
            raise ValueError(f"latents[{name!r}] has {arr.shape[0]} rows for {len(ids)} ids")
    final = latents_dir(output, class_folder)
    with atomic_dir(final) as tmp:
        np.savez(
            tmp / "latents.npz",
            ids=np.array(ids, dtype=str),
            **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
        )
        atomic_write_json(tmp / "meta.json", {**meta, "count": len(ids)})
    return final


def read_latents(
    output: str | os.PathLike, class_folder: str
) -> tuple[list[str], dict[str, np.ndarray], dict]:
    """(ids, {"mean", "std", "latent", ...}, meta) for one class."""
    folder = latents_dir(output, class_folder)
    meta = _read_meta(folder, "latents", "vae_latents")
    with np.load(folder / "latents.npz", allow_pickle=False) as data:
        ids = [str(x) for x in data["ids"]]
        arrays = {k: data[k] for k in data.files if k != "ids"}
    return ids, arrays, meta
