"""The published dataset's layout: class versions, the merged index, build records (no streaming import).

Layout of a dataset root (``<output>/mds``)::

    classes/<class-dir>/<version>/   one build of one class (shards, index.json, build.json); never
                                     modified once written; <version> is derived from its content
    classes/<class-dir>/current.json {"version": ...}: what the latest mds_shards run of the class wrote
    index.json                       THE PUBLISHED DATASET: the merged index over one version of every
                                     class; its "imagenet_int8" key holds the dataset's build record
    build.json                       the same build record, for people and tools (written after index.json)
    .previous-index.json             the index that was published before the current one

Readers see exactly what ``index.json`` names. Re-materializing a class only adds a version and
moves ``current.json``; the dataset changes when ``swap_in_index`` atomically replaces ``index.json``.
Versions are deleted only when neither the published index, the one published before it (readers
that opened it may still be reading), nor a class's ``current.json`` refers to them.

Reading these files needs only ``json``; keeping it apart from ``core.dataset.mds`` (which imports
mosaicml-streaming, and with it torch) keeps the asset checks and the merge fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imagenet_int8_assets.core.latents.quantize import DEFAULT_RANGE
from imagenet_int8_assets.core.common.files import (
    TMP_PREFIX,
    TRASH_PREFIX,
    atomic_write_bytes,
    atomic_write_json,
    move_into_place,
)
from imagenet_int8_assets.core.common.layout import class_dir_name

LATENT_SHAPE = (4, 32, 32)  # what the published schema's 4096-byte "uint8" column holds
BUILD_INFO = "build.json"
INDEX = "index.json"
CLASSES = "classes"
CURRENT = "current.json"
PREVIOUS_INDEX = ".previous-index.json"
RECORD_KEY = "imagenet_int8"  # the build record embedded in the published index.json


def columns_for(shape: tuple[int, ...], value_range: float, with_flip: bool = False) -> dict[str, str]:
    """MDS columns for latents of ``shape`` quantized over +-``value_range``.

    The published schema (custom ``uint8`` encoding, decoded by every published reader with
    ``(u / 255 - 0.5) * 24``) is used only where it is exact: 4x32x32 latents and range 12.
    Anything else uses streaming's built-in ``ndarray:uint8:C,H,W``, which needs no registration
    and returns shaped arrays; ``build.json`` then records the shape and the dequantization.
    """
    compatible = tuple(shape) == LATENT_SHAPE and float(value_range) == DEFAULT_RANGE
    encoding = "uint8" if compatible else "ndarray:uint8:" + ",".join(str(int(d)) for d in shape)
    columns = {"vae_output": encoding, "label": "str", "label_as_text": "str"}
    if with_flip:
        columns["vae_output_flip"] = encoding
    return columns


def dequantize_formula(value_range: float) -> str:
    return f"z = (u / 255 - 0.5) * {2 * float(value_range):g}"


def read_index(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"No MDS index at {str(path)!r}: materialize the 'mds_shards' asset for this class."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def index_sample_count(index: dict) -> int:
    return int(sum(shard["samples"] for shard in index["shards"]))


# --------------------------------------------------------------------------------------------
# Class versions


def class_home(root: str | os.PathLike, class_name: str) -> Path:
    """``root/classes/<class-dir>``: every version of one class."""
    return Path(root) / CLASSES / class_dir_name(class_name)


def content_version(folder: str | os.PathLike) -> str:
    """A version id for a finished class folder: a hash of its index.json and build.json.

    The index lists every shard's size and hashes, so equal ids mean equal bytes: rebuilding a
    class with the same settings and inputs gives the same version (and adds nothing).
    """
    digest = hashlib.sha256()
    for name in (INDEX, BUILD_INFO):
        digest.update((Path(folder) / name).read_bytes())
    return "v-" + digest.hexdigest()[:16]


def commit_class_version(
    root: str | os.PathLike, class_name: str, staged: str | os.PathLike, replace: bool = False
) -> Path:
    """Move a fully written class folder ``staged`` into place as a new version; make it current.

    The version folder appears with one rename (or is already there with the same content, and
    ``staged`` is deleted unless ``replace``: then it replaces that folder, e.g. a damaged one),
    and ``current.json`` is replaced atomically. The published dataset is not touched.
    """
    home = class_home(root, class_name)
    home.mkdir(parents=True, exist_ok=True)
    version = content_version(staged)
    final = home / version
    # The pointer moves first, so a sweep by another run (collect_garbage) never sees the new
    # version unreferenced; a kill between the two leaves a pointer to a missing folder, which
    # current_version_dir reports ("re-materialize mds_shards"), never a wrong dataset.
    atomic_write_json(home / CURRENT, {"version": version, "class": class_name})
    if final.is_dir() and not replace:
        shutil.rmtree(staged)
    else:
        move_into_place(staged, final)
    return final


def current_version_dir(root: str | os.PathLike, class_name: str) -> Path:
    """The folder of the class version the latest mds_shards run wrote."""
    home = class_home(root, class_name)
    pointer = home / CURRENT
    if not pointer.is_file():
        raise FileNotFoundError(
            f"No MDS shards for class {class_name!r} (no {pointer}): materialize the 'mds_shards' asset "
            "for this class."
        )
    folder = home / json.loads(pointer.read_text(encoding="utf-8"))["version"]
    if not (folder / INDEX).is_file():
        raise FileNotFoundError(
            f"Class {class_name!r}: {folder} is missing or incomplete; re-materialize 'mds_shards' for this class."
        )
    return folder


def read_class_index(root: str | os.PathLike, class_name: str) -> dict:
    return read_index(current_version_dir(root, class_name))


def read_class_build_info(root: str | os.PathLike, class_name: str) -> dict:
    return read_build_info(current_version_dir(root, class_name))


# --------------------------------------------------------------------------------------------
# The published dataset


def read_published_index(root: str | os.PathLike) -> dict | None:
    """The published ``index.json`` (None when nothing has been published yet)."""
    path = Path(root) / INDEX
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def published_record(root: str | os.PathLike) -> dict | None:
    """The build record of the published dataset (embedded in index.json), or None."""
    index = read_published_index(root)
    return None if index is None else index.get(RECORD_KEY)


def merged_index(
    root: str | os.PathLike, class_names: list[str], folders: Mapping[str, Path] | None = None
) -> tuple[dict, dict]:
    """The index over one version of every class, in the given class order: ``folders[name]``
    (the folders a check approved, see ``publish_checks.check_publishable``), else each class's
    current version.

    Each shard entry is copied with its file names prefixed by the version folder
    (``classes/<class-dir>/<version>/``), which StreamingDataset resolves relative to ``root``.
    Returns (index, summary) with summary {"samples", "shards", "per_class", "versions"}.
    """
    root = Path(root)
    shards, per_class, versions = [], {}, {}
    for name in class_names:
        folder = Path(folders[name]) if folders is not None else current_version_dir(root, name)
        prefix = folder.relative_to(root).as_posix()
        index = read_index(folder)
        for shard in index["shards"]:
            entry = json.loads(json.dumps(shard))
            for key in ("raw_data", "zip_data"):
                if entry.get(key):
                    entry[key]["basename"] = f"{prefix}/{entry[key]['basename']}"
            shards.append(entry)
        per_class[name] = index_sample_count(index)
        versions[name] = prefix
    summary = {"samples": sum(per_class.values()), "shards": len(shards), "per_class": per_class, "versions": versions}
    return {"version": 2, "shards": shards}, summary


def dataset_record(build_info: dict, summary: dict) -> dict:
    """The dataset's build record: how it was built, how to decode it, what it holds."""
    info = {k: v for k, v in build_info.items() if k not in ("count", "label", "label_as_text")}
    return {**info, "samples": summary["samples"], "per_class": summary["per_class"], "versions": summary["versions"]}


def swap_in_index(root: str | os.PathLike, index: dict, record: dict) -> bool:
    """Make ``index`` (with ``record`` embedded) the published dataset, atomically.

    The index being replaced is kept as ``.previous-index.json`` first, so its shards survive one
    more publication. ``build.json`` is written after the index. Returns False (and writes
    nothing) when the published index already has exactly this content.
    """
    root = Path(root)
    body = json.dumps({**index, RECORD_KEY: record}, indent=2, sort_keys=True).encode("utf-8")
    current = root / INDEX
    old = current.read_bytes() if current.is_file() else None
    if old == body:
        if not (root / BUILD_INFO).is_file():
            atomic_write_json(root / BUILD_INFO, record)
        return False
    if old is not None:
        atomic_write_bytes(root / PREVIOUS_INDEX, old)
    atomic_write_bytes(current, body)
    atomic_write_json(root / BUILD_INFO, record)
    return True


def _referenced_versions(index: dict | None, root: Path) -> set[Path]:
    out = set()
    for shard in (index or {}).get("shards", []):
        for key in ("raw_data", "zip_data"):
            if shard.get(key):
                out.add((root / shard[key]["basename"]).parent)
    return out


def _read_json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def collect_garbage(root: str | os.PathLike, class_names: list[str] | None = None) -> list[str]:
    """Delete class versions that no published index and no ``current.json`` refers to.

    Kept: the versions of the published index and of the one published before it, and each
    class's current version. ``class_names`` limits the sweep to those classes. Temporary folders
    of writes in progress are left to the writer of that class (``write_class_shards`` removes a
    killed write's leftovers before it writes). Returns what it removed, relative to ``root``.
    """
    root = Path(root)
    classes = root / CLASSES
    if not classes.is_dir():
        return []
    keep = _referenced_versions(read_published_index(root), root)
    keep |= _referenced_versions(_read_json_or_none(root / PREVIOUS_INDEX), root)
    if class_names is None:
        homes = sorted(p for p in classes.iterdir() if p.is_dir() and not p.name.startswith("."))
    else:
        homes = [class_home(root, name) for name in class_names if class_home(root, name).is_dir()]
    removed = []
    for home in homes:
        pointer = _read_json_or_none(home / CURRENT)
        if pointer and pointer.get("version"):
            keep.add(home / pointer["version"])
        for version in sorted(home.iterdir()):
            if version.is_dir() and version.name.startswith("v-") and version not in keep:
                shutil.rmtree(version, ignore_errors=True)
                removed.append(version.relative_to(root).as_posix())
    return removed


def stray_entries(root: str | os.PathLike, class_names: list[str]) -> list[str]:
    """Entries under ``root`` that the dataset does not account for (reported, not deleted)."""
    root = Path(root)
    if not root.is_dir():
        return []
    known = {INDEX, BUILD_INFO, CLASSES, PREVIOUS_INDEX}
    strays = [p.name for p in root.iterdir() if p.name not in known and not p.name.startswith((TMP_PREFIX, TRASH_PREFIX))]
    classes = root / CLASSES
    if classes.is_dir():
        dirs = {class_dir_name(c) for c in class_names}
        strays += [
            f"{CLASSES}/{p.name}"
            for p in classes.iterdir()
            if p.name not in dirs and not p.name.startswith((TMP_PREFIX, TRASH_PREFIX))
        ]
    return sorted(strays)


# Build settings that must agree across every class of one dataset.
PROVENANCE_FIELDS = (
    ("vae", "requested"),
    ("vae", "source"),
    ("vae", "revision"),
    ("vae", "weights_sha256"),
    ("crops", "recipe"),
    ("crops", "size"),
    ("latent_value",),
    ("seed",),
    ("quant_range",),
    ("precision",),
    ("latent_shape",),
    ("schema",),
)


def provenance_of(build_info: dict) -> tuple:
    """The settings in ``build_info`` that must be equal for classes to share one dataset."""
    out = []
    for path in PROVENANCE_FIELDS:
        value: Any = build_info
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (list, dict)):
            value = json.dumps(value, sort_keys=True)
        out.append((".".join(path), value))
    return tuple(out)


def read_build_info(folder: str | os.PathLike) -> dict:
    path = Path(folder) / BUILD_INFO
    if not path.is_file():
        raise FileNotFoundError(
            f"No {BUILD_INFO} in {str(folder)!r}: materialize the 'mds_shards' asset for this class."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def inconsistent_classes(build_infos: dict[str, dict]) -> list[str]:
    """Human-readable differences when the classes were built with different settings."""
    groups: dict[tuple, list[str]] = {}
    for folder, info in build_infos.items():
        groups.setdefault(provenance_of(info), []).append(folder)
    if len(groups) <= 1:
        return []
    lines = []
    for prov, folders in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        settings = ", ".join(f"{k}={v}" for k, v in prov)
        shown = ", ".join(folders[:10]) + (" ..." if len(folders) > 10 else "")
        lines.append(f"{len(folders)} class(es) [{shown}] built with {settings}")
    return lines
