"""preprocessed_crops: every good image of a class, cropped to S x S RGB and stored losslessly."""


import numpy as np
from dagster import (
    AssetExecutionContext,
    BackfillPolicy,
    MaterializeResult,
    MetadataValue,
    asset,
)

from imagenet_int8_assets.assets.disk_space import SpaceNeeds
from imagenet_int8_assets.assets.manifest import (
    ok_rows,
    raw_manifest,
    read_manifest,
    require_classes_in_source,
    source_class_files,
)
from imagenet_int8_assets.assets.metadata import GROUP, markdown_table, progress_logger
from imagenet_int8_assets.core.parallel import map_ordered
from imagenet_int8_assets.core.preprocess import crop_task
from imagenet_int8_assets.core.sources import resolve_source_root
from imagenet_int8_assets.core.storage import write_crops
from imagenet_int8_assets.partitions import class_partitions
from imagenet_int8_assets.resources import (
    DEFAULT_MAX_PARTITIONS_PER_RUN,
    ImagenetInt8Settings,
)


@asset(
    name="preprocessed_crops",
    group_name=GROUP,
    partitions_def=class_partitions,
    backfill_policy=BackfillPolicy.multi_run(DEFAULT_MAX_PARTITIONS_PER_RUN),
    deps=[raw_manifest, source_class_files],
    kinds={"numpy"},
    description=(
        "The manifest's good images of one class, cropped to S x S RGB with the configured "
        "recipe (imagenet.int8: pixel-identical to the published build; adm: the ADM centre "
        "crop). Stored losslessly as crops/<class>/images.npy (uint8 N x S x S x 3) with the "
        "ids in crops/<class>/meta.json; read back with "
        "imagenet_int8_assets.core.storage.read_crops(output, class)."
    ),
)
def preprocessed_crops(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
    settings.require_recorded_settings_or_fail()
    require_classes_in_source(settings, context.partition_keys)
    manifest = read_manifest(settings)
    root = resolve_source_root(settings.source_path())
    size = settings.crop_size
    total = sum(len(ok_rows(manifest, key)) for key in context.partition_keys)
    space = SpaceNeeds("preprocessed_crops", settings.output_path, total)
    for key in context.partition_keys:
        rows = ok_rows(manifest, key)
        tasks = [(str(root / i), settings.crop_recipe, size, settings.max_pixels) for i in rows["id"]]
        images = np.empty((len(tasks), size, size, 3), dtype=np.uint8)
        ids, failed = [], []
        progress = progress_logger(context.log.info, f"{key}: crops", total=len(tasks))
        for n, (image_id, (arr, reason)) in enumerate(
            zip(rows["id"], map_ordered(crop_task, tasks, settings.worker_count(), chunksize=8)), 1
        ):
            if arr is None:
                failed.append({"id": image_id, "reason": reason})
                context.log.warning(f"{key}: could not crop {image_id}: {reason}")
            else:
                images[len(ids)] = arr
                ids.append(image_id)
            progress(n)
        space.writing(len(ids), images[: len(ids)].nbytes, key)
        with space.guard():
            folder = write_crops(
                settings.output_path,
                key,
                ids,
                images[: len(ids)],
                {"recipe": settings.crop_recipe, "size": size, "failed": failed},
            )
        context.add_asset_metadata(
            {
                "path": MetadataValue.path(str(folder)),
                "images": len(ids),
                "failed": len(failed),
                "failures": MetadataValue.md(markdown_table(failed)),
                "recipe": settings.crop_recipe,
                "size": size,
                "bytes": int(images[: len(ids)].nbytes),
            },
            partition_key=key,
        )
        context.log.info(f"{key}: {len(ids)} crops written to {folder} ({len(failed)} failed)")
    return MaterializeResult()


