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
from typing import Any

import numpy as np
from streaming import MDSWriter, StreamingDataset
from streaming.base.format.mds.encodings import Encoding, _encodings

from imagenet_int8_assets.core.mds_index import BUILD_INFO, COLUMNS, LATENT_SHAPE
from imagenet_int8_assets.core.quantize import DEFAULT_RANGE, dequantize
from imagenet_int8_assets.core.storage import atomic_dir, atomic_write_json

SIZE_LIMIT = 1 << 26


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
