"""preprocessed_crops: every good image of a class, cropped to S x S RGB and stored losslessly."""


import numpy as np
from dagster import (
    AssetExecutionContext,
    BackfillPolicy,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from imagenet_int8_assets.assets.disk_space import SpaceNeeds
from imagenet_int8_assets.assets.manifest import (
    ok_rows_by_class,
    raw_manifest,
    read_manifest,
    require_classes_in_source,
    source_class_files,
)
from imagenet_int8_assets.assets.metadata import GROUP, PartitionMetadata, markdown_table, progress_logger
from imagenet_int8_assets.core.crop_store import expected_bytes
from imagenet_int8_assets.core.parallel import map_ordered
from imagenet_int8_assets.core.preprocess import crop_task
from imagenet_int8_assets.core.sources import resolve_source_root
from imagenet_int8_assets.core.storage import bytes_per_image, folder_bytes, write_crops
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
        "crop). Kept as IMAGENET_INT8_CROP_STORAGE says: 'none' (default: only "
        "crops/<class>/meta.json, with each crop's sha256 and its source file's size and mtime; "
        "readers recompute the crop from the source and verify it), 'png' (lossless PNGs) or "
        "'raw' (crops/<class>/images.npy, uint8 N x S x S x 3). Read back in every mode with "
        "imagenet_int8_assets.core.storage.read_crops(output, class)."
    ),
)
def preprocessed_crops(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
    settings.require_recorded_settings_or_fail()
    require_classes_in_source(settings, context.partition_keys)
    manifest = read_manifest(settings)
    root = resolve_source_root(settings.source_path())
    size = settings.crop_size
    by_class = ok_rows_by_class(manifest, context.partition_keys)
    total = sum(map(len, by_class.values()))
    space = SpaceNeeds("preprocessed_crops", settings.output_path, total)
    partition_metadata = PartitionMetadata(context)
    progress = progress_logger(context.log.info, f"crops of {len(by_class)} class(es)", total=total)
    done = written = failures = 0
    for key in context.partition_keys:
        rows = by_class.pop(key)
        tasks = [(str(root / i), settings.crop_recipe, size, settings.max_pixels) for i in rows["id"]]
        images = np.empty((len(tasks), size, size, 3), dtype=np.uint8)
        ids, failed = [], []
        for n, (image_id, (arr, reason)) in enumerate(
            zip(rows["id"], map_ordered(crop_task, tasks, settings.worker_count(), chunksize=8)), 1
        ):
            if arr is None:
                failed.append({"id": image_id, "reason": reason})
                context.log.warning(f"{key}: could not crop {image_id}: {reason}")
            else:
                images[len(ids)] = arr
                ids.append(image_id)
            progress(done + n)
        done += len(tasks)
        space.writing(len(ids), expected_bytes(settings.crop_storage, len(ids), size), key)
        with space.guard():
            folder = write_crops(
                settings.output_path,
                key,
                ids,
                images[: len(ids)],
                {"recipe": settings.crop_recipe, "size": size, "max_pixels": settings.max_pixels, "failed": failed},
                storage=settings.crop_storage,
                source_root=root,
            )
        on_disk = folder_bytes(folder)
        partition_metadata.add(
            key,
            {
                "path": MetadataValue.path(str(folder)),
                "images": len(ids),
                "failed": len(failed),
                "failures": MetadataValue.md(markdown_table(failed)),
                "recipe": settings.crop_recipe,
                "size": size,
                "crop_storage": settings.crop_storage,
                "bytes": on_disk,
                "bytes_per_image": bytes_per_image(on_disk, len(ids)),
            },
        )
        written, failures = written + len(ids), failures + len(failed)
    context.log.info(f"{written} crops of {len(by_class)} class(es) written ({failures} failed); per class in the metadata")
    return MaterializeResult()


def crop_pixels_or_fail(images):
    """The crops' pixels: a ``CropArray`` (png and none crops) is computed and
    verified here, and a crop that no longer matches (a changed source file) is a one-line
    ``Failure`` naming the files and what to re-materialize; raw crops are returned as they are
    (memory-mapped)."""
    from imagenet_int8_assets.core.crop_store import CropArray, CropVerificationError

    if not isinstance(images, CropArray):
        return images
    try:
        return images.load()
    except CropVerificationError as exc:
        raise Failure(description=str(exc), allow_retries=False) from None
