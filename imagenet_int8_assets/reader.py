"""Reading a built dataset: import this module and the 'uint8' latent column decodes correctly.

Importing registers the published ``uint8`` encoding (4096-byte latents) over streaming's
built-in one-byte scalar of the same name. ``open_dataset`` first verifies the dataset (every shard
named by ``index.json`` exists, has its recorded size and content hash) and raises
``DatasetDamaged`` naming the damaged file and how to repair it; it then returns a
``LatentStreamingDataset``, whose samples are ``{"latent": float32 (C, H, W), "label": int,
"label_as_text": str}`` (plus ``latent_flip`` when stored), decoded with the shape and range the
dataset records; it is safe in DataLoader workers under any start method, since unpickling it
imports this package.

``load_latents`` loads a whole dataset (a folder or a Hugging Face Hub dataset repo id) as numpy
arrays in one go, straight from the shards: ``LatentArrays`` with uint8 ``codes`` (N, C, H, W),
int64 ``labels``, one text per label, the stored flipped codes and the decode parameters.
``decode_codes`` and ``batch`` turn its codes into float latents on a device (GPU when present),
with flip augmentation where it is correct. ``export_parquet`` writes a dataset as Parquet (what
``datasets.load_dataset`` reads). No Dagster import.
"""

from __future__ import annotations

import os
import warnings

from imagenet_int8_assets.core.dataset_check import VERIFY_MODES, DatasetDamaged, check_dataset
from imagenet_int8_assets.core.latent_arrays import LatentArrays, load_latents
from imagenet_int8_assets.core.latent_torch import FlipUnsupported, batch, decode_codes
from imagenet_int8_assets.core.mds import LatentStreamingDataset, Uint8Latents, register_uint8_encoding
from imagenet_int8_assets.core.parquet_export import export_parquet
from imagenet_int8_assets.core.quantize import dequantize

# Importing core.mds above registered the "uint8" latent encoding for this process.


def open_dataset(
    path: str | os.PathLike, local: str | os.PathLike | None = None, verify: str = "hash", **kwargs
) -> LatentStreamingDataset:
    """Open a dataset built by this project (or the published one), after verifying it.

    ``path`` is the dataset folder (``<output>/mds`` or a download of Imagenet.int8). With
    ``local`` it is treated as the remote and copied shard by shard into ``local``. ``verify``:
    ``"hash"`` (default: every shard exists, has its recorded size and xxh3_64 hash), ``"size"``
    (existence and size only) or ``"none"``; damage raises ``DatasetDamaged``. A dataset whose
    index records no hashes (the published Imagenet.int8) gets its sizes verified, with a warning.
    The shape and range of the codes come from the dataset's build record (the defaults are the
    published ones). Other keyword arguments go to StreamingDataset (``shuffle``, ``batch_size``, ...).
    The returned dataset's ``verified`` attribute says what was checked.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"open_dataset(verify={verify!r}): use one of {', '.join(VERIFY_MODES)}")
    kwargs.setdefault("batch_size", 1)
    verified = "nothing (remote dataset: shards are checked by streaming when downloaded)"
    if "://" not in os.fspath(path):  # a local folder: verify it and read how its codes decode
        check = check_dataset(path, verify)
        for note in check.notes:
            warnings.warn(note, stacklevel=2)
        kwargs.setdefault("latent_shape", check.decode.latent_shape)
        kwargs.setdefault("value_range", check.decode.value_range)
        verified = check.verified
    if local is None:
        dataset = LatentStreamingDataset(local=os.fspath(path), **kwargs)
    else:
        dataset = LatentStreamingDataset(local=os.fspath(local), remote=os.fspath(path), **kwargs)
    dataset.verified = verified
    return dataset


__all__ = [
    "DatasetDamaged",
    "FlipUnsupported",
    "LatentArrays",
    "LatentStreamingDataset",
    "Uint8Latents",
    "batch",
    "decode_codes",
    "dequantize",
    "export_parquet",
    "load_latents",
    "open_dataset",
    "register_uint8_encoding",
]
