"""quantization_stats: per-channel statistics of the stored latents over every class."""


import json

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from imagenet_int8_assets.assets.disk_space import disk_full_guard
from imagenet_int8_assets.assets.manifest import dataset_classes
from imagenet_int8_assets.assets.metadata import GROUP, markdown_table
from imagenet_int8_assets.core.latents.quantize import ChannelStats, recommend_ranges, step
from imagenet_int8_assets.core.common.layout import MissingArtifact, stats_path
from imagenet_int8_assets.core.common.files import atomic_write_json
from imagenet_int8_assets.core.dataset.footprint import disk_footprint
from imagenet_int8_assets.core.latents.latent_store import read_latents
from imagenet_int8_assets.resources import ImagenetInt8Settings

CHANNEL_COLUMNS = ["channel", "count", "min", "max", "mean", "std", "p0.1", "p1", "p50", "p99", "p99.9", "clip_fraction", "quant_rmse", "non_finite"]


@asset(
    name="quantization_stats",
    group_name=GROUP,
    deps=["vae_latents"],
    kinds={"json"},
    description=(
        "Per channel, over all classes and per class: min, max, mean, std, percentiles "
        "(0.1, 1, 50, 99, 99.9), the fraction of values clipped by the uint8 range and the "
        "quantization RMSE. Reads one class at a time (constant memory)."
    ),
)
def quantization_stats(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
    settings.require_recorded_settings_or_fail()
    keys = dataset_classes(context.instance, settings).in_dataset
    overall: ChannelStats | None = None
    per_class_rows, per_class_json, missing = [], {}, []
    for key in keys:
        try:
            ids, arrays, meta = read_latents(settings.output_path, key)
        except MissingArtifact:
            missing.append(key)
            continue
        latent = arrays["latent"]
        value_range = settings.range_for(meta["vae"]["quant_range"])
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
    clip = totals["clip_fraction"] if total else 0.0
    rmse = totals["quant_rmse"] if total else 0.0
    value_range = overall.value_range if overall is not None else settings.range_for(0.0)
    recommended = recommend_ranges(channels)
    path = stats_path(settings.output_path)
    record = {
        "quant_range": value_range,
        "step": step(value_range),
        "recommended": recommended,
        "overall": channels,
        "per_class": per_class_json,
        "clip_fraction": clip,
        "quant_rmse": rmse,
    }
    with disk_full_guard("quantization_stats", settings.output_path) as space:
        space.writing(1, len(json.dumps(record, indent=2, default=float)))
        atomic_write_json(path, record)
    context.log.info(f"{total} latent values: clip fraction {clip:.4%}, quantization RMSE {rmse:.4f}")
    # what the class stages occupy on disk (docs/OUTPUT.md: "Disk footprint"), over the dataset's classes
    footprint = disk_footprint(settings.output_path, keys)
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "quant_range": value_range,
            "quant_step": step(value_range),
            "recommended_range": recommended["range"],
            "recommended_per_channel": MetadataValue.json(recommended["per_channel"]),
            "recommendation": recommended["note"],
            "values": total,
            "clip_fraction": clip,
            "quant_rmse": rmse,
            "non_finite_values": totals["non_finite"],
            "per_channel": MetadataValue.md(markdown_table(channels, CHANNEL_COLUMNS)),
            "per_class": MetadataValue.md(markdown_table(per_class_rows)),
            "disk_footprint": MetadataValue.md(
                markdown_table([{"stage": stage, **values} for stage, values in footprint.items()])
            ),
            "disk_bytes": int(sum(v["bytes"] for v in footprint.values())),
        }
    )

