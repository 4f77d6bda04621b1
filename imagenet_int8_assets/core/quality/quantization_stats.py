"""The statistics stage: per-channel statistics of the stored latents over the dataset's classes,
one class at a time (constant memory), as the ``quantization_stats`` asset records them in
``quantization_stats.json`` (what the ``quantization_stats`` asset and the benchmark's reference
build call)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from imagenet_int8_assets.core.common.layout import MissingArtifact
from imagenet_int8_assets.core.latents.latent_store import read_latents
from imagenet_int8_assets.core.latents.quantize import (
    RANGE_KEY,
    ChannelStats,
    codes_range,
    recommend_ranges,
    resolve_range,
    step,
)


@dataclass
class LatentStatistics:
    """``record``: what ``quantization_stats.json`` holds (quant_range, step, recommended, overall,
    per_class, clip_fraction, quant_rmse). ``per_class_rows``: per class its images, mean, clip
    fraction and quantization RMSE; ``totals``: over every value (``values``, ``non_finite``, ...)."""

    record: dict
    per_class_rows: list[dict]
    totals: dict

    @property
    def value_range(self) -> float:
        return self.record[RANGE_KEY]


def latent_statistics(output: str | os.PathLike, keys: Sequence[str], quant_range: float = 0.0) -> LatentStatistics:
    """The statistics of ``keys``' stored latents, each class at the range its codes are made at
    (``codes_range``: the ``quant_range`` setting, else the VAE's default). Raises
    ``MissingArtifact`` naming every class without latents."""
    overall: ChannelStats | None = None
    per_class_rows, per_class_json, missing = [], {}, []
    for key in keys:
        try:
            ids, arrays, meta = read_latents(output, key)
        except MissingArtifact:
            missing.append(key)
            continue
        latent = arrays["latent"]
        value_range = codes_range(quant_range, meta)
        stats = ChannelStats(latent.shape[1], value_range)
        stats.update(latent)
        if overall is None:
            overall = ChannelStats(latent.shape[1], value_range)
        overall.merge(stats)
        per_class_json[key] = stats.summary()
        totals = stats.totals()
        per_class_rows.append(
            {"class": key, "images": len(ids), **{k: totals[k] for k in ("mean", "clip_fraction", "quant_rmse")}}
        )
    if missing:
        raise MissingArtifact(
            f"vae_latents is not materialized for {len(missing)} class(es): {', '.join(missing[:20])}"
            f"{' ...' if len(missing) > 20 else ''}. Materialize those partitions first."
        )
    channels = overall.summary() if overall is not None else []
    totals = overall.totals() if overall is not None else {"values": 0, "non_finite": 0}
    total = totals["values"]
    value_range = overall.value_range if overall is not None else resolve_range(quant_range, 0.0)  # no latents
    record = {
        RANGE_KEY: value_range,
        "step": step(value_range),
        "recommended": recommend_ranges(channels),
        "overall": channels,
        "per_class": per_class_json,
        "clip_fraction": totals["clip_fraction"] if total else 0.0,
        "quant_rmse": totals["quant_rmse"] if total else 0.0,
    }
    return LatentStatistics(record, per_class_rows, totals)
