"""MDS output in the published Imagenet.int8 schema, the merged index, and the reader side.

Schema (``index.json`` of every class folder)::

    vae_output      custom encoding named "uint8": the C-order uint8 latent bytes (4096 = 4x32x32)
    label           str, the label index ("402")
    label_as_text   str ("acoustic guitar")

mosaicml-streaming has a BUILT-IN scalar encoding also named ``uint8`` (one byte). Importing this
module replaces it with ``Uint8Latents`` (variable size, bytes in / dequantized float32 out, the
same as the published readers' class), for writing and for reading. ``LatentStreamingDataset``
lives here so that DataLoader workers, which unpickle it, import this module and register the
encoding too, whatever their start method.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from streaming import MDSWriter, StreamingDataset
from streaming.base.format.mds.encodings import Encoding, _encodings

from imagenet_int8_assets.core.quantize import DEFAULT_RANGE, dequantize
from imagenet_int8_assets.core.storage import TMP_PREFIX, TRASH_PREFIX, atomic_dir, atomic_write_json

SIZE_LIMIT = 1 << 26
COLUMNS = {"vae_output": "uint8", "label": "str", "label_as_text": "str"}
LATENT_SHAPE = (4, 32, 32)
BUILD_INFO = "build.json"


class Uint8Latents(Encoding):
    """The published ``uint8`` column: raw bytes on disk, dequantized float32 when read."""

    def encode(self, obj: Any) -> bytes:
        arr = np.asarray(obj)
        if arr.dtype != np.uint8:
            raise TypeError(f"vae_output must be a uint8 array, got {arr.dtype}")
        return np.ascontiguousarray(arr).tobytes()

    def decode(self, data: bytes) -> Any:
        return dequantize(np.frombuffer(data, np.uint8), DEFAULT_RANGE)


def register_uint8_encoding() -> None:
    """Make ``uint8`` mean the published 4096-byte latent column in this process (idempotent)."""
    _encodings["uint8"] = Uint8Latents


register_uint8_encoding()


def write_class_shards(
    folder: str | os.PathLike,
    latents_u8: np.ndarray,
    label: int,
    label_text: str,
    build_info: dict,
) -> int:
    """Write one class as MDS shards into ``folder`` (replaced atomically). Returns the count.

    ``latents_u8`` is uint8 (N, 4, 32, 32). ``build_info`` is saved beside the index as
    ``build.json`` (readers ignore it; the merge step checks every class agrees).
    """
    latents_u8 = np.ascontiguousarray(latents_u8, dtype=np.uint8)
    if latents_u8.shape[1:] != LATENT_SHAPE:
        raise ValueError(
            f"the Imagenet.int8 schema stores {LATENT_SHAPE} latents, got {latents_u8.shape[1:]}"
        )
    register_uint8_encoding()
    with atomic_dir(folder) as tmp:
        with MDSWriter(out=str(tmp), columns=COLUMNS, compression=None, size_limit=SIZE_LIMIT) as out:
            for row in latents_u8:
                out.write({"vae_output": row, "label": str(int(label)), "label_as_text": label_text})
        index = tmp / "index.json"
        if not index.is_file():  # an empty class: an index with no shards
            atomic_write_json(index, {"version": 2, "shards": []})
        atomic_write_json(tmp / BUILD_INFO, {**build_info, "count": int(latents_u8.shape[0])})
    return int(latents_u8.shape[0])


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


class LatentStreamingDataset(StreamingDataset):
    """StreamingDataset over an Imagenet.int8-style dataset whose samples are ready to train on.

    Each sample is ``{"latent": float32 (4, 32, 32), "label": int, "label_as_text": str}``.
    All StreamingDataset arguments apply (``local``, ``remote``, ``shuffle``, ``batch_size``...).
    """

    def __getitem__(self, idx):  # type: ignore[override]
        sample = super().__getitem__(idx)
        return {
            "latent": np.asarray(sample["vae_output"], np.float32).reshape(LATENT_SHAPE),
            "label": int(sample["label"]),
            "label_as_text": sample["label_as_text"],
        }


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
)


def provenance_of(build_info: dict) -> tuple:
    """The settings in ``build_info`` that must be equal for classes to share one dataset."""
    out = []
    for path in PROVENANCE_FIELDS:
        value: Any = build_info
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
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
    value_range = float(build_info.get("quant_range", DEFAULT_RANGE))
    info = {k: v for k, v in build_info.items() if k not in ("count", "label", "label_as_text")}
    atomic_write_json(
        Path(root) / BUILD_INFO,
        {
            **info,
            "samples": summary["samples"],
            "per_class": summary["per_class"],
            "schema": COLUMNS,
            "latent_shape": list(LATENT_SHAPE),
            "dequantize": f"z = (u / 255 - 0.5) * {2 * value_range:g}",
        },
    )


def verify_readable(root: str | os.PathLike) -> dict:
    """Open ``root`` with a real StreamingDataset; returns its sample count and first sample."""
    register_uint8_encoding()
    dataset = StreamingDataset(local=str(root), batch_size=1, shuffle=False)
    try:
        count = int(dataset.num_samples)
        first = dataset[0] if count else None
    finally:
        del dataset
    return {
        "samples": count,
        "first_shape": tuple(np.asarray(first["vae_output"]).shape) if first else None,
        "first_label": first["label"] if first else None,
    }
