"""Reading a built dataset: import this module and the 'uint8' latent column decodes correctly.

Importing registers the published ``uint8`` encoding (4096-byte latents) over streaming's
built-in one-byte scalar of the same name. ``open_dataset`` first verifies the dataset (every shard
named by ``index.json`` exists, has its recorded size and content hash) and raises
``DatasetDamaged`` naming the damaged file and how to repair it (a remote dataset, ``s3://...``,
has each shard checked against its recorded hash as streaming downloads it); it then returns a
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

import contextlib
import os
import warnings

from imagenet_int8_assets.core.dataset.dataset_check import FAST_HASHES, VERIFY_MODES, DatasetDamaged, check_dataset
from imagenet_int8_assets.core.reading.latent_arrays import LatentArrays, load_latents
from imagenet_int8_assets.core.reading.latent_torch import FlipUnsupported, batch, decode_codes
from imagenet_int8_assets.core.dataset.mds import (
    LatentStreamingDataset,
    Uint8Latents,
    open_streaming,
    register_uint8_encoding,
)
from imagenet_int8_assets.core.reading.parquet_export import export_parquet
from imagenet_int8_assets.core.latents.quantize import dequantize
from imagenet_int8_assets.core.common.urls import redact_url

# Importing core.dataset.mds above registered the "uint8" latent encoding for this process.


def open_dataset(
    path: str | os.PathLike, local: str | os.PathLike | None = None, verify: str = "hash", **kwargs
) -> LatentStreamingDataset:
    """Open a dataset built by this project (or the published one), after verifying it.

    ``path`` is the dataset folder (``<output>/mds`` or a download of Imagenet.int8), or a remote
    URL (``s3://bucket/prefix``...). With ``local`` it is treated as the remote and copied shard by
    shard into ``local``. ``verify``: ``"hash"`` (default: every shard exists, has its recorded size
    and xxh3_64 hash), ``"size"`` (existence and size only) or ``"none"``; damage raises
    ``DatasetDamaged``. A dataset whose index records no hashes (the published Imagenet.int8) gets
    its sizes verified, with a warning. A remote dataset cannot be checked before it is downloaded:
    with ``verify="hash"`` streaming checks each shard against the hash its index records as it
    downloads it (``validate_hash``), and a mismatch raises ``DatasetDamaged`` when the shard is
    read. The shape and range of the codes come from the dataset's build record, for a remote one too
    (the defaults are the published ones). Other keyword arguments go to StreamingDataset (``shuffle``, ``batch_size``,
    ...). The returned dataset's ``verified`` attribute says what was checked, and when.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"open_dataset(verify={verify!r}): use one of {', '.join(VERIFY_MODES)}")
    kwargs.setdefault("batch_size", 1)
    if "://" in os.fspath(path):  # a remote: only downloads can be checked
        dataset = open_streaming(
            _CheckedDownloads, remote=os.fspath(path), local=None if local is None else os.fspath(local), **kwargs
        )
        _decode_as_recorded(dataset, kwargs)
        dataset.verified = _check_downloads(dataset, verify, os.fspath(path))
        return dataset
    check = check_dataset(path, verify)  # a local folder: verify it and read how its codes decode
    for note in check.notes:
        warnings.warn(note, stacklevel=2)
    kwargs.setdefault("latent_shape", check.decode.latent_shape)
    kwargs.setdefault("value_range", check.decode.value_range)
    if local is None:
        dataset = open_streaming(LatentStreamingDataset, local=os.fspath(path), **kwargs)
    else:
        dataset = open_streaming(LatentStreamingDataset, local=os.fspath(local), remote=os.fspath(path), **kwargs)
    dataset.verified = check.verified
    return dataset


def _decode_as_recorded(dataset: LatentStreamingDataset, given: dict) -> None:
    """Decode a remote dataset's codes with the shape and range its index records (streaming has
    downloaded index.json into the local cache): a dataset built with another range or layout must
    not be read with the published 4x32x32 at +-12. Values the caller passed are kept."""
    import json

    from imagenet_int8_assets.core.dataset.dataset_check import decode_params

    stream = dataset.streams[0]
    folder = os.path.join(stream.local, stream.split or "")
    with open(os.path.join(folder, "index.json"), "rb") as fh:
        params = decode_params(folder, json.loads(fh.read().decode("utf-8")))
    if "latent_shape" not in given:
        dataset.latent_shape = tuple(params.latent_shape)
    if "value_range" not in given:
        dataset.value_range = float(params.value_range)


def _check_downloads(dataset: LatentStreamingDataset, verify: str, url: str) -> str:
    """Turn on streaming's ``validate_hash`` for a remote dataset (unless the caller chose an
    algorithm) with the first fast hash that every shard records; returns what ``verified`` says."""
    shown = redact_url(url)
    chosen = {stream.validate_hash for stream in dataset.streams}
    if chosen != {None}:  # the caller's validate_hash=...: streaming applies it as given
        algo = ", ".join(sorted(str(a) for a in chosen))
    elif verify != "hash":
        return f"nothing (verify={verify!r}: shards downloaded from {shown} are not checked; use verify='hash')"
    else:
        recorded = [set(info.hashes) for shard in dataset.shards for pair in shard.file_pairs for info in pair if info]
        algo = next((a for a in FAST_HASHES if recorded and all(a in hashes for hashes in recorded)), None)
        if algo is None:
            warnings.warn(
                f"{shown}: index.json records no {'/'.join(FAST_HASHES)} hash for every shard, so downloaded shards "
                "cannot be checked (the published Imagenet.int8 records none); download it and open the folder to "
                "verify sizes.",
                stacklevel=3,
            )
            return f"nothing (the index of {shown} records no shard hashes: downloads are not checked)"
        for stream in dataset.streams:
            stream.validate_hash = algo
    return (
        f"each shard's {algo} hash recorded in index.json, by streaming as the shard is downloaded from {shown} "
        "(a mismatch raises DatasetDamaged; shards already in the local cache when it was opened are not re-checked)"
    )


class _CheckedDownloads(LatentStreamingDataset):
    """A remote dataset whose shards streaming checks as it downloads them (``validate_hash``).

    Streaming 0.13 leaves a shard that fails the check in the cache, where the next read would
    decode it, and marked as being downloaded, where the next read would wait for ever: this
    removes the download, marks the shard remote again (the next read downloads and checks it
    anew) and raises ``DatasetDamaged`` naming the shard and the remote."""

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        from streaming.base.dataset import _ShardState

        try:
            super().prepare_shard(shard_id, blocking)
        except ValueError as exc:
            if not str(exc).startswith("Checksum failure"):
                raise
            stream, shard = self.streams[self.stream_per_shard[shard_id]], self.shards[shard_id]
            with self._cache_filelock:
                for info in (info for pair in shard.file_pairs for info in pair if info):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(stream.local, stream.split, info.basename))
                self._shard_states[shard_id] = _ShardState.REMOTE
            basename = shard.file_pairs[0][0].basename
            raise DatasetDamaged(
                f"Dataset damaged: shard {basename} downloaded from {redact_url(str(stream.remote))} does not match the "
                f"{stream.validate_hash} hash its index.json records (the bucket's copy was changed or damaged; the "
                "download was discarded, nothing of it was read): re-materialize mds_dataset where the dataset is "
                "built (it checks every object by content and names the one to delete), then read again."
            ) from None


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
