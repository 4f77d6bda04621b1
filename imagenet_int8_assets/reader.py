"""Reading a built dataset: import this module and the 'uint8' latent column decodes correctly.

Importing registers the published ``uint8`` encoding (4096-byte latents) over streaming's
built-in one-byte scalar of the same name. ``open_dataset`` returns a ``LatentStreamingDataset``,
whose samples are ``{"latent": float32 (C, H, W), "label": int, "label_as_text": str}`` (plus
``latent_flip`` when stored), decoded with the shape and range recorded in ``build.json``; it is
safe in DataLoader workers under any start method, since unpickling it imports this package.
No Dagster import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from imagenet_int8_assets.core.mds import LatentStreamingDataset, Uint8Latents, register_uint8_encoding
from imagenet_int8_assets.core.mds_index import BUILD_INFO, LATENT_SHAPE
from imagenet_int8_assets.core.quantize import DEFAULT_RANGE, dequantize

# Importing core.mds above registered the "uint8" latent encoding for this process.


def open_dataset(path: str | os.PathLike, local: str | os.PathLike | None = None, **kwargs) -> LatentStreamingDataset:
    """Open a dataset built by this project (or the published one).

    ``path`` is the dataset folder (``<output>/mds`` or a download of Imagenet.int8). With
    ``local`` it is treated as the remote and copied shard by shard into ``local``. Other keyword
    arguments go to StreamingDataset (``shuffle``, ``batch_size``, ...).
    """
    kwargs.setdefault("batch_size", 1)
    info_file = Path(path) / BUILD_INFO
    if info_file.is_file():  # our datasets say how their codes decode; the published one has none
        info = json.loads(info_file.read_text(encoding="utf-8"))
        kwargs.setdefault("latent_shape", tuple(info.get("latent_shape", LATENT_SHAPE)))
        kwargs.setdefault("value_range", float(info.get("quant_range", DEFAULT_RANGE)))
    if local is None:
        return LatentStreamingDataset(local=os.fspath(path), **kwargs)
    return LatentStreamingDataset(local=os.fspath(local), remote=os.fspath(path), **kwargs)


__all__ = ["LatentStreamingDataset", "Uint8Latents", "dequantize", "open_dataset", "register_uint8_encoding"]
