"""The mds_shards stage: one class's latents quantized and written as a new MDS version, as the
asset and the benchmark's reference call it."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from imagenet_int8_assets.core.common.layout import mds_root
from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.latents.encode import non_finite_count
from imagenet_int8_assets.core.latents.latent_store import read_latents
from imagenet_int8_assets.core.latents.quantize import codes_range, quantize


class NonFiniteLatents(ValueError):
    """A class's stored latents hold NaN or infinity: no shards are written for it."""


@dataclass(frozen=True)
class ClassShards:
    """One written class version: its folder, its index.json and sample count, and the codes' range."""

    key: str
    folder: Path
    index: dict
    samples: int
    value_range: float


def write_class_version(
    output: str | os.PathLike,
    key: str,
    label: int,
    label_text: str,
    quant_range: float,
    space: Callable[[int, int, str], object] | None = None,
) -> ClassShards:
    """Quantize ``key``'s stored latents (the range decided by ``quantize.codes_range`` from the
    setting ``quant_range`` and the latents' record) and write them as a new immutable version under
    ``mds/classes/<key>/``, then remove that class's unpublished older versions. Nothing is
    published: ``publish_dataset`` does that.

    ``space(images, nbytes, key)`` returns the disk-space guard of the write (``guard()``, as the
    asset's ``SpaceNeeds``). Raises ``NonFiniteLatents`` (nothing written) when a latent is not finite.
    """
    from imagenet_int8_assets.core.dataset import mds  # mosaicml-streaming: imported where shards are written

    root = mds_root(output)
    ids, arrays, meta = read_latents(output, key)
    bad = non_finite_count(*arrays.values())
    if bad:
        raise NonFiniteLatents(
            f"{key}: {bad} non-finite latent values; re-materialize vae_latents for this class "
            "(the latents_are_finite check explains which) before writing shards."
        )
    value_range = codes_range(quant_range, meta)
    latent, flips = arrays["latent"], arrays.get("latent_flip")
    nbytes = latent.size * (1 if flips is None else 2)
    with space(len(ids), nbytes, key).guard() if space is not None else nullcontext():
        folder = mds.write_class_shards(
            root,
            key,
            quantize(latent, value_range),
            label,
            label_text,
            {**meta, "label": label, "label_as_text": label_text},
            value_range=value_range,
            flips_u8=quantize(flips, value_range) if flips is not None else None,
        )
    mds_index.collect_garbage(root, [key])  # unpublished older versions of this class
    index = mds_index.read_index(folder)
    return ClassShards(key, folder, index, mds_index.index_sample_count(index), value_range)
