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

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from streaming import MDSWriter, StreamingDataset
from streaming.base.format.mds.encodings import Encoding, _encodings

from imagenet_int8_assets.core.dataset.dataset_check import DatasetDamaged, check_dataset
from imagenet_int8_assets.core.dataset.mds_index import (
    BUILD_INFO,
    INDEX,
    LATENT_SHAPE,
    class_home,
    columns_for,
    commit_class_version,
    content_version,
    dequantize_formula,
)
from imagenet_int8_assets.core.latents.quantize import DEFAULT_RANGE, dequantize
from imagenet_int8_assets.core.common.files import atomic_write_json, staging_dir

SIZE_LIMIT = 1 << 26
# Recorded per shard in index.json (raw_data.hashes): sha1 is what streaming's validate_hash
# checks on download; xxh3_64 is fast enough to verify a whole local dataset when it is opened.
SHARD_HASHES = ("sha1", "xxh3_64")


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
    root: str | os.PathLike,
    class_name: str,
    latents_u8: np.ndarray,
    label: int,
    label_text: str,
    build_info: dict,
    value_range: float = DEFAULT_RANGE,
    flips_u8: np.ndarray | None = None,
) -> Path:
    """Write one class as a new version under ``root`` (see ``mds_index``); returns its folder.

    ``latents_u8`` is uint8 (N, C, H, W), quantized over +-``value_range``; ``flips_u8`` the same
    for the flipped crops (a ``vae_output_flip`` column). The schema follows
    ``mds_index.columns_for``. ``build_info`` is saved beside the index as ``build.json`` with the
    count, schema, shape and dequantization added (readers ignore it; the merge step checks that
    every class agrees). The shards are written into a hidden temporary folder and appear as a
    version with one rename; the class's ``current.json`` then points at it. The published
    dataset (``root/index.json``) is not touched: ``mds_index.swap_in_index`` does that.
    """
    latents_u8 = np.ascontiguousarray(latents_u8, dtype=np.uint8)
    shape = tuple(latents_u8.shape[1:])
    columns = columns_for(shape, value_range, with_flip=flips_u8 is not None)
    if flips_u8 is not None and flips_u8.shape != latents_u8.shape:
        raise ValueError(f"flipped latents {flips_u8.shape} do not match latents {latents_u8.shape}")
    register_uint8_encoding()
    # One run writes a class at a time (its partition), so a killed write's leftovers in the
    # class's home are removed first; the version's name is known only once it is written.
    with staging_dir(class_home(root, class_name)) as tmp:
        with MDSWriter(
            out=str(tmp), columns=columns, compression=None, size_limit=SIZE_LIMIT, hashes=list(SHARD_HASHES)
        ) as out:
            for i, row in enumerate(latents_u8):
                sample = {"vae_output": row, "label": str(int(label)), "label_as_text": label_text}
                if flips_u8 is not None:
                    sample["vae_output_flip"] = np.ascontiguousarray(flips_u8[i], dtype=np.uint8)
                out.write(sample)
        index = tmp / INDEX
        if not index.is_file():  # an empty class: an index with no shards
            atomic_write_json(index, {"version": 2, "shards": []})
        atomic_write_json(
            tmp / BUILD_INFO,
            {
                **build_info,
                "count": int(latents_u8.shape[0]),
                "schema": columns,
                "latent_shape": list(shape),
                "quant_range": float(value_range),
                "dequantize": dequantize_formula(value_range),
            },
        )
        existing = tmp.parent / content_version(tmp)
        # the same content written before and damaged since is replaced
        damaged = existing.is_dir() and not _intact(existing)
        return commit_class_version(root, class_name, tmp, replace=damaged)


def _intact(folder: Path) -> bool:
    try:
        check_dataset(folder, "hash")
    except DatasetDamaged:
        return False
    return True


class LatentStreamingDataset(StreamingDataset):
    """StreamingDataset over an Imagenet.int8-style dataset whose samples are ready to train on.

    Each sample is ``{"latent": float32 (C, H, W), "label": int, "label_as_text": str}`` plus
    ``"latent_flip"`` when the dataset stores flipped latents. ``latent_shape`` and
    ``value_range`` describe the stored codes (``open_dataset`` reads them from ``build.json``;
    the defaults are the published dataset's). All StreamingDataset arguments apply.
    """

    def __init__(self, *args, latent_shape=LATENT_SHAPE, value_range: float = DEFAULT_RANGE, **kwargs):
        self.latent_shape = tuple(latent_shape)
        self.value_range = float(value_range)
        super().__init__(*args, **kwargs)

    def _latent(self, value) -> np.ndarray:
        arr = np.asarray(value)
        if arr.dtype == np.uint8:  # ndarray:uint8 column: dequantize with the recorded range
            arr = dequantize(arr, self.value_range)
        return arr.astype(np.float32, copy=False).reshape(self.latent_shape)

    def __getitem__(self, idx):  # type: ignore[override]
        sample = super().__getitem__(idx)
        out = {
            "latent": self._latent(sample["vae_output"]),
            "label": int(sample["label"]),
            "label_as_text": sample["label_as_text"],
        }
        if "vae_output_flip" in sample:
            out["latent_flip"] = self._latent(sample["vae_output_flip"])
        return out


PREFIX_RACE_ATTEMPTS = 5


def open_streaming(cls: type = StreamingDataset, **kwargs: Any):
    """``cls(**kwargs)`` (a StreamingDataset class), tried again when another process registered
    the same shared-memory prefix at the same moment.

    StreamingDataset looks for the first free prefix (``/dev/shm/NNNNNN_*``), then creates its
    ``NNNNNN_locals`` segment: two processes on one machine that open datasets together can pick
    the same prefix, and the later one fails with ``FileExistsError``. Trying again picks the next
    free prefix. Any other error, and the race lost ``PREFIX_RACE_ATTEMPTS`` times, is raised.
    """
    attempt = 1
    while True:
        try:
            return cls(**kwargs)
        except FileExistsError as exc:
            if "_locals" not in str(exc) or attempt >= PREFIX_RACE_ATTEMPTS:
                raise
        time.sleep(0.05 * attempt)
        attempt += 1


def verify_readable(root: str | os.PathLike) -> dict:
    """Open ``root`` with a real StreamingDataset; returns its sample count and first sample."""
    register_uint8_encoding()
    dataset = open_streaming(local=str(root), batch_size=1, shuffle=False)
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
