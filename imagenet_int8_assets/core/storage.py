"""On-disk layout of the intermediate artifacts, and atomic writes.

Layout under the output root (``IMAGENET_INT8_OUTPUT``)::

    manifest/manifest.parquet        raw manifest (one row per source file)
    crops/<class>/images.npy         crop_storage=raw: uint8 (N, S, S, 3) crops, C order, lossless
    crops/<class>/images/<row>.png   crop_storage=png: one lossless PNG per crop
    crops/<class>/meta.json          {"ids", "failed", "recipe", "size", "storage", "sha256", "source", ...}
                                     (crop_storage=none: only this; see ``crop_store``)
    latents/<class>/latents.npz      float32 latent (N, C, h, w), latent_flip, ids; mean, std (latent_storage=full)
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


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of every file under ``folder`` (0 when it does not exist): what a partition occupies."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name), follow_symlinks=False).st_size
            except OSError:
                pass
    return total


def bytes_per_image(nbytes: int, images: int) -> float:
    """``nbytes / images`` rounded to 0.1 byte (0 for no image): the ``bytes_per_image`` metadata."""
    return round(nbytes / images, 1) if images else 0.0


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


FOOTPRINT_STAGES = ("crops", "latents", "shards")


def disk_footprint(output: str | os.PathLike, classes: list[str]) -> dict[str, dict]:
    """What each class stage occupies over ``classes``: per stage (crops, latents, the classes'
    current MDS versions) the files' ``bytes``, the ``images`` they hold and ``bytes_per_image``.
    Missing partitions count as 0."""
    from imagenet_int8_assets.core import mds_index

    totals = {stage: {"bytes": 0, "images": 0} for stage in FOOTPRINT_STAGES}
    for name in classes:
        for stage, folder in (("crops", crops_dir(output, name)), ("latents", latents_dir(output, name))):
            try:
                count = int(json.loads((folder / "meta.json").read_text(encoding="utf-8")).get("count", 0))
            except (OSError, ValueError):
                continue
            totals[stage]["bytes"] += folder_bytes(folder)
            totals[stage]["images"] += count
        try:
            version = mds_index.current_version_dir(mds_root(output), name)
            count = mds_index.index_sample_count(mds_index.read_index(version))
        except (OSError, ValueError, KeyError):
            continue
        totals["shards"]["bytes"] += folder_bytes(version)
        totals["shards"]["images"] += count
    for value in totals.values():
        value["bytes_per_image"] = bytes_per_image(value["bytes"], value["images"])
    return totals


# --------------------------------------------------------------------------------------------
# Crops


def write_crops(
    output: str | os.PathLike,
    class_folder: str,
    ids: list[str],
    images: np.ndarray,
    meta: dict,
    storage: str = "raw",
    source_root: str | os.PathLike | None = None,
) -> Path:
    """Store one class's crops atomically. ``images`` is uint8 (N, S, S, 3).

    ``storage`` is ``raw``, ``png`` or ``none`` (``IMAGENET_INT8_CROP_STORAGE``; see
    ``core.crop_store``); ``source_root``, the folder the ids are relative to, is recorded so that
    ``none`` crops can be recomputed (and verified) from the source.
    """
    from imagenet_int8_assets.core.crop_store import write_class_crops

    return write_class_crops(
        output, crops_dir(output, class_folder), ids, images, meta, storage=storage, source_root=source_root
    )


def read_crops(
    output: str | os.PathLike,
    class_folder: str,
    mmap: bool = False,
    source_root: str | os.PathLike | None = None,
    workers: int = 1,
) -> tuple[list[str], np.ndarray]:
    """One class's crops: (ids, uint8 array N x S x S x 3), rows in the order of ``ids``, whatever
    the crop storage they were written with.

    ``raw`` crops come back as a numpy array (``mmap=True`` maps the file instead of reading it,
    for classes larger than memory). ``png`` and ``none`` crops come back as a
    ``crop_store.CropArray`` that decodes (``png``) or recomputes from the source (``none``) rows
    when indexed, on ``workers`` processes for a whole class, and verifies each against the sha256
    recorded when the crops were made (``CropVerificationError`` names the files that changed).
    ``source_root`` replaces the source folder recorded for ``none`` crops (a moved source).
    """
    ids, images, _ = read_crops_with_meta(output, class_folder, mmap=mmap, source_root=source_root, workers=workers)
    return ids, images


def read_crops_with_meta(
    output: str | os.PathLike,
    class_folder: str,
    mmap: bool = False,
    source_root: str | os.PathLike | None = None,
    workers: int = 1,
) -> tuple[list[str], np.ndarray, dict]:
    """``read_crops`` and the crops' ``meta.json``."""
    from imagenet_int8_assets.core.crop_store import open_class_crops

    folder = crops_dir(output, class_folder)
    meta = _read_meta(folder, "crops", "preprocessed_crops")
    ids = list(meta["ids"])
    images = open_class_crops(output, folder, class_folder, meta, mmap=mmap, source_root=source_root, workers=workers)
    if images.shape[0] != len(ids):
        raise MissingArtifact(f"{folder}: {images.shape[0]} crops but {len(ids)} ids; re-materialize it")
    return ids, images, meta


# --------------------------------------------------------------------------------------------
# Latents


# IMAGENET_INT8_LATENT_STORAGE: which float32 arrays latents/<class>/latents.npz keeps.
# ``full``: the posterior mean and std, the stored latent and its flip; ``latent``: only what the
# dataset, the statistics, the report and the parquet export read (the stored latent and its flip).
LATENT_STORAGES = ("full", "latent")
DEFAULT_LATENT_STORAGE = "full"
LATENT_ONLY_ARRAYS = ("latent", "latent_flip")


def check_latent_storage(value: str) -> str:
    if value not in LATENT_STORAGES:
        raise ValueError(f"unknown latent storage {value!r}: use one of {', '.join(LATENT_STORAGES)}")
    return value


def latents_to_store(arrays: dict[str, np.ndarray], storage: str = DEFAULT_LATENT_STORAGE) -> dict[str, np.ndarray]:
    """The arrays that ``storage`` keeps (``full``: all of them; ``latent``: the stored latent and its flip)."""
    if check_latent_storage(storage) == "full":
        return dict(arrays)
    return {k: v for k, v in arrays.items() if k in LATENT_ONLY_ARRAYS}


def write_latents(
    output: str | os.PathLike,
    class_folder: str,
    ids: list[str],
    arrays: dict[str, np.ndarray],
    meta: dict,
    storage: str = DEFAULT_LATENT_STORAGE,
) -> Path:
    """Store one class's latents (float32 arrays keyed by name, first axis = image) atomically.

    ``storage`` (``full`` or ``latent``, see ``latents_to_store``) decides which arrays are kept;
    it is not written into ``meta`` (which becomes part of the dataset's build record): the file's
    arrays say what it holds.
    """
    arrays = latents_to_store(arrays, storage)
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
    """(ids, {"latent", ...}, meta) for one class: ``latent`` (what the dataset stores) and
    ``latent_flip`` when flips are stored; ``mean`` and ``std`` only when written with
    ``latent_storage=full`` (and ``std`` only for VAEs with a posterior)."""
    folder = latents_dir(output, class_folder)
    meta = _read_meta(folder, "latents", "vae_latents")
    with np.load(folder / "latents.npz", allow_pickle=False) as data:
        ids = [str(x) for x in data["ids"]]
        arrays = {k: data[k] for k in data.files if k != "ids"}
    return ids, arrays, meta
