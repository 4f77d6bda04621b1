"""quantization_stats: per-channel statistics of the stored latents over every class."""


import json

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from imagenet_int8_assets.assets.disk_space import disk_full_guard
from imagenet_int8_assets.assets.manifest import dataset_classes
from imagenet_int8_assets.assets.metadata import DATASET_GROUP, markdown_table
from imagenet_int8_assets.core.latents.quantize import step
from imagenet_int8_assets.core.common.layout import stats_path
from imagenet_int8_assets.core.common.files import atomic_write_json
from imagenet_int8_assets.core.dataset.footprint import disk_footprint
from imagenet_int8_assets.core.quality.quantization_stats import latent_statistics
from imagenet_int8_assets.resources import ImagenetInt8Settings

# every column of ChannelStats.summary(): the per_channel table of the materialization
STATS_TABLE_COLUMNS = ["channel", "count", "min", "max", "mean", "std", "p0.1", "p1", "p50", "p99", "p99.9", "clip_fraction", "quant_rmse", "non_finite"]


@asset(
    name="quantization_stats",
    group_name=DATASET_GROUP,
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
    stats = latent_statistics(settings.output_path, keys, settings.quant_range)
    record, totals = stats.record, stats.totals
    total, clip, rmse = totals["values"], record["clip_fraction"], record["quant_rmse"]
    value_range, recommended, channels = stats.value_range, record["recommended"], record["overall"]
    path = stats_path(settings.output_path)
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
            "per_channel": MetadataValue.md(markdown_table(channels, STATS_TABLE_COLUMNS)),
            "per_class": MetadataValue.md(markdown_table(stats.per_class_rows)),
            "disk_footprint": MetadataValue.md(
                markdown_table([{"stage": stage, **values} for stage, values in footprint.items()])
            ),
            "disk_bytes": int(sum(v["bytes"] for v in footprint.values())),
        }
    )

