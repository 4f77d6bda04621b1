"""Reading a built dataset: import this module and the 'uint8' latent column decodes correctly.

Importing registers the published ``uint8`` encoding (4096-byte latents) over streaming's
built-in one-byte scalar of the same name. ``open_dataset`` returns a ``LatentStreamingDataset``,
whose samples are ``{"latent": float32 (4, 32, 32), "label": int, "label_as_text": str}``; it is
safe in DataLoader workers under any start method, since unpickling it imports this package.
No Dagster import.
"""

from __future__ import annotations

import os

from imagenet_int8_assets.core.mds import LatentStreamingDataset, Uint8Latents, register_uint8_encoding
from imagenet_int8_assets.core.quantize import dequantize

register_uint8_encoding()


def open_dataset(path: str | os.PathLike, local: str | os.PathLike | None = None, **kwargs) -> LatentStreamingDataset:
    """Open a dataset built by this project (or the published one).

    ``path`` is the dataset folder (``<output>/mds`` or a download of Imagenet.int8). With
    ``local`` it is treated as the remote and copied shard by shard into ``local``. Other keyword
    arguments go to StreamingDataset (``shuffle``, ``batch_size``, ...).
    """
    kwargs.setdefault("batch_size", 1)
    if local is None:
        return LatentStreamingDataset(local=os.fspath(path), **kwargs)
    return LatentStreamingDataset(local=os.fspath(local), remote=os.fspath(path), **kwargs)


__all__ = ["LatentStreamingDataset", "Uint8Latents", "dequantize", "open_dataset", "register_uint8_encoding"]
