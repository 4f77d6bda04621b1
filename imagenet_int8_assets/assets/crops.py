"""preprocessed_crops: every good image of a class, cropped to S x S RGB and stored as the crop
storage setting says (the asset itself is defined with vae_latents in crops_and_latents.py)."""


import numpy as np
from dagster import MetadataValue

from imagenet_int8_assets.assets.disk_space import SpaceNeeds
from imagenet_int8_assets.assets.manifest import require_classes_in_source_or_fail
from imagenet_int8_assets.assets.metadata import PartitionMetadata, markdown_table, progress_logger
from imagenet_int8_assets.core.crops.crop_store import expected_bytes
from imagenet_int8_assets.core.source.manifest import ok_rows_by_class, read_manifest
from imagenet_int8_assets.core.common.parallel import map_ordered
from imagenet_int8_assets.core.crops.preprocess import CropTask, crop_task
from imagenet_int8_assets.core.crops.preprocess import crop_tasks as tasks_of
from imagenet_int8_assets.core.source.sources import resolve_source_root
from imagenet_int8_assets.core.common.files import bytes_per_image, folder_bytes
from imagenet_int8_assets.core.crops.crop_store import write_crops
from imagenet_int8_assets.resources import ImagenetInt8Settings


CROPS_DESCRIPTION = (
    "The manifest's good images of one class, cropped to S x S RGB with the configured "
    "recipe (imagenet.int8: pixel-identical to the published build; adm: the ADM centre "
    "crop). Kept as IMAGENET_INT8_CROP_STORAGE says: 'none' (default: only "
    "`crops/<class>/meta.json`, with each crop's sha256 and its source file's size and mtime; "
    "readers recompute the crop from the source and verify it), 'png' (lossless PNGs) or "
    "'raw' (`crops/<class>/images.npy`, uint8 N x S x S x 3). Read back in every mode with "
    "`imagenet_int8_assets.core.crops.crop_store.read_crops(output, class)`. Materialized with vae_latents "
    "in one step (crops_and_latents): the crops are made once, while the VAE encodes."
)


def crop_tasks(settings: ImagenetInt8Settings, root, rows) -> list[CropTask]:
    """The ``CropTask``s of a class's manifest rows."""
    return tasks_of(root, rows["id"], settings.crop_recipe, settings.crop_size, settings.max_pixels)


class CropWriter:
    """Writes classes' crops (``IMAGENET_INT8_CROP_STORAGE``) with their per-partition metadata;
    shared by the crops-only step and the step that crops while it encodes."""

    def __init__(self, context, settings: ImagenetInt8Settings, root, total: int):
        self.settings, self.root, self.log = settings, root, context.log
        self.space = SpaceNeeds("preprocessed_crops", settings.output_path, total)
        self.metadata = PartitionMetadata(context, "preprocessed_crops")
        self.written = self.failures = 0

    def write(self, key: str, ids: list[str], images: np.ndarray, failed: list[dict]) -> None:
        settings, size = self.settings, self.settings.crop_size
        for failure in failed:
            self.log.warning(f"{key}: could not crop {failure['id']}: {failure['reason']}")
        self.space.writing(len(ids), expected_bytes(settings.crop_storage, len(ids), size), key)
        with self.space.guard():
            folder = write_crops(
                settings.output_path,
                key,
                ids,
                images,
                {"recipe": settings.crop_recipe, "size": size, "max_pixels": settings.max_pixels, "failed": failed},
                storage=settings.crop_storage,
                source_root=self.root,
            )
        on_disk = folder_bytes(folder)
        self.metadata.add(
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
        self.written, self.failures = self.written + len(ids), self.failures + len(failed)

    def summary(self, classes: int) -> str:
        return f"{self.written} crops of {classes} class(es) written ({self.failures} failed); per class in the metadata"


def manifest_rows(context, settings: ImagenetInt8Settings) -> tuple[dict, object]:
    """The step's classes' good manifest rows ({class: rows}) and the source root; refuses a run
    whose settings conflict with the output's or whose classes left the source."""
    settings.require_recorded_settings_or_fail()
    require_classes_in_source_or_fail(settings, context.partition_keys)
    by_class = ok_rows_by_class(read_manifest(settings.output_path), context.partition_keys)
    return by_class, resolve_source_root(settings.source_path())


def crop_classes(context, settings: ImagenetInt8Settings) -> None:
    """Only the crops (``preprocessed_crops`` materialized without ``vae_latents``): each class
    cropped on the worker processes, then written."""
    by_class, root = manifest_rows(context, settings)
    total = sum(map(len, by_class.values()))
    writer = CropWriter(context, settings, root, total)
    size = settings.crop_size
    progress = progress_logger(context.log.info, f"crops of {len(by_class)} class(es)", total=total)
    done = 0
    for key in context.partition_keys:
        rows = by_class.pop(key)
        tasks = crop_tasks(settings, root, rows)
        images = np.empty((len(tasks), size, size, 3), dtype=np.uint8)
        ids, failed = [], []
        for n, (image_id, (arr, reason)) in enumerate(
            zip(rows["id"], map_ordered(crop_task, tasks, settings.worker_count(), chunksize=8)), 1
        ):
            if arr is None:
                failed.append({"id": image_id, "reason": reason})
            else:
                images[len(ids)] = arr
                ids.append(image_id)
            progress(done + n)
        done += len(tasks)
        writer.write(key, ids, images[: len(ids)], failed)
    context.log.info(writer.summary(len(context.partition_keys)))

