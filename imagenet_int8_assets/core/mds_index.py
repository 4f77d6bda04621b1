"""The merged index and per-class build records of an MDS dataset (no streaming import).

Reading ``index.json`` and ``build.json`` needs only ``json``; keeping it apart from ``core.mds``
(which imports mosaicml-streaming, and with it torch) keeps the asset checks and the merge fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from imagenet_int8_assets.core.quantize import DEFAULT_RANGE
from imagenet_int8_assets.core.storage import TMP_PREFIX, TRASH_PREFIX, atomic_write_json

LATENT_SHAPE = (4, 32, 32)  # what the published schema's 4096-byte "uint8" column holds
BUILD_INFO = "build.json"


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


def merge_class_indexes(root: str | os.PathLike, class_folders: list[str]) -> dict:
    """Write ``root/index.json`` listing every class's shards, in the given class order.

    Each shard entry is copied with its file names prefixed by the class folder, which
    StreamingDataset resolves relative to ``root``. Idempotent; replaces the file atomically.
    Returns {"samples": total, "shards": count, "per_class": {class: samples}}.
    """
    root = Path(root)
    shards, per_class = [], {}
    for folder in class_folders:
        index = read_index(root / folder)
        for shard in index["shards"]:
            entry = json.loads(json.dumps(shard))
            for key in ("raw_data", "zip_data"):
                if entry.get(key):
                    entry[key]["basename"] = f"{folder}/{entry[key]['basename']}"
            shards.append(entry)
        per_class[folder] = index_sample_count(index)
    atomic_write_json(root / "index.json", {"version": 2, "shards": shards})
    return {"samples": sum(per_class.values()), "shards": len(shards), "per_class": per_class}


def stray_entries(root: str | os.PathLike, class_folders: list[str]) -> list[str]:
    """Entries under ``root`` that the merged index does not account for (not deleted)."""
    root = Path(root)
    if not root.is_dir():
        return []
    known = set(class_folders) | {"index.json", BUILD_INFO}
    return sorted(
        p.name
        for p in root.iterdir()
        if p.name not in known and not p.name.startswith((TMP_PREFIX, TRASH_PREFIX))
    )


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


def write_dataset_info(root: str | os.PathLike, build_info: dict, summary: dict) -> None:
    """``root/build.json``: how the dataset was built and how to decode it (readers ignore it)."""
    info = {k: v for k, v in build_info.items() if k not in ("count", "label", "label_as_text")}
    atomic_write_json(Path(root) / BUILD_INFO, {**info, "samples": summary["samples"], "per_class": summary["per_class"]})
