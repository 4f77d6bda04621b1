"""vae_latents: the crops encoded by the VAE (the asset itself is defined with preprocessed_crops
in crops_and_latents.py), plus the blocking check that they are finite."""


import time

from dagster import AssetCheckExecutionContext, Failure, MetadataValue, asset_check

from imagenet_int8_assets.assets.crops import CropWriter, manifest_rows
from imagenet_int8_assets.assets.disk_space import SpaceNeeds
from imagenet_int8_assets.assets.metadata import PartitionMetadata, progress_logger
from imagenet_int8_assets.assets.partition_checks import per_partition_results
from imagenet_int8_assets.core.latents.encode import non_finite_count
from imagenet_int8_assets.core.latents.encode_step import JSON_FIELDS, CropsChanged, CropSource, EncodeConfig
from imagenet_int8_assets.core.latents.encode_step import encode_classes as encode_stage
from imagenet_int8_assets.core.latents.latent_store import read_latents
from imagenet_int8_assets.core.latents.vae import load_vae
from imagenet_int8_assets.partitions import class_partitions
from imagenet_int8_assets.resources import ImagenetInt8Settings


LATENTS_DESCRIPTION = (
    "The crops of one class encoded by the VAE (GPU when there is one, fp32). Stores the "
    "latent that goes into the dataset ('sample': mean + std * noise seeded by the run seed "
    "and the image id, so rebuilds give the same bytes; or 'mean') as float32, and with "
    "IMAGENET_INT8_LATENT_STORAGE=full (default) the posterior mean and std too, in "
    "`latents/<class>/latents.npz`. A batched run loads the model once for all its partitions; "
    "materialized with preprocessed_crops, worker processes crop while the VAE encodes."
)


# A VAE loaded by a class run process of `imagenet-int8 build` before its run was given to it
# (class_runs: while the manifest run scans): the run's encode step takes it instead of loading.
_preloaded: dict[tuple[str, str], tuple[object, float]] = {}


def _timed_load(settings: ImagenetInt8Settings) -> tuple[object, float]:
    started = time.monotonic()
    vae = load_vae(settings.vae, fallback=settings.vae_fallback or None)
    return vae, time.monotonic() - started


def _vae_key(settings: ImagenetInt8Settings) -> tuple[str, str]:
    return settings.vae, settings.vae_fallback or ""


def preload_vae(settings: ImagenetInt8Settings) -> None:
    """Load the settings' VAE now (torch and diffusers imported, weights read into host memory) for
    this process's next encode step. A failure is left for that step's own load to report."""
    try:
        _preloaded[_vae_key(settings)] = _timed_load(settings)
    except Exception:
        return


def _load_vae(settings: ImagenetInt8Settings) -> tuple[object, str]:
    """The step's VAE: the one preloaded for these settings (used once), else loaded now; and how
    long loading took, as the log says it."""
    preloaded = _preloaded.pop(_vae_key(settings), None)
    if preloaded is not None:
        return preloaded[0], f"in {preloaded[1]:.1f}s before the run started"
    vae, seconds = _timed_load(settings)
    return vae, f"in {seconds:.1f}s"


def encode_config(settings: ImagenetInt8Settings) -> EncodeConfig:
    """The settings the encode stage reads."""
    return EncodeConfig(
        output=settings.output_path, precision=settings.precision, batch_size=settings.batch_size,
        workers=settings.worker_count(), store_flip=settings.store_flip, latent_value=settings.latent_value,
        seed=settings.seed, latent_storage=settings.latent_storage, quant_range=settings.quant_range,
        vae_fallback=settings.vae_fallback, crop_recipe=settings.crop_recipe, crop_size=settings.crop_size,
        max_pixels=settings.max_pixels, devices=settings.devices, device=settings.device,
        device_wait=settings.device_wait,
    )


def encode_classes(context, settings: ImagenetInt8Settings, crop_too: bool) -> None:
    """Encode the step's classes on a leased device (core.latents.encode_step): with ``crop_too``
    cropping them from the source on the way (``preprocessed_crops`` in the same step, written class
    by class), else from the stored crops; each class's record becomes its metadata."""
    from imagenet_int8_assets.core.latents.devices import DeviceLeaseTimeout, DeviceSettingError

    # refusals (other settings, classes gone from the source) before a device or a model is touched
    source = writer = None
    if crop_too:
        rows, root = manifest_rows(context, settings)
        source = CropSource(rows, root)
        writer = CropWriter(context, settings, root, sum(len(rows[k]) for k in context.partition_keys))
    else:
        settings.require_recorded_settings_or_fail()
    # one device per run that encodes: N devices, N runs at once (the gpu pool's limit); only
    # choosing and leasing the device raise these two errors
    try:
        result = encode_stage(
            encode_config(settings), list(context.partition_keys), lambda: _load_vae(settings),
            purpose=context.run_id, crop_source=source, crop_writer=writer,
            space=lambda total: SpaceNeeds("vae_latents", settings.output_path, total),
            info=context.log.info, warning=context.log.warning,
            progress=lambda label, total: progress_logger(context.log.info, label, total=total),
        )
    except (DeviceSettingError, DeviceLeaseTimeout) as exc:
        raise Failure(description=str(exc), allow_retries=isinstance(exc, DeviceLeaseTimeout)) from None
    except CropsChanged as exc:
        raise Failure(description=str(exc), allow_retries=False) from None
    metadata = PartitionMetadata(context, "vae_latents")
    for key, record in result.classes.items():
        metadata.add(key, {
            k: MetadataValue.path(v) if k == "path" else MetadataValue.json(v) if k in JSON_FIELDS else v
            for k, v in record.items()
        })
    context.log.info(
        f"{result.written} latents of {len(context.partition_keys)} class(es) written; per class (path, bytes, "
        "timing) in the metadata"
    )


@asset_check(
    asset="vae_latents",
    partitions_def=class_partitions,
    blocking=True,
    description="Blocks the dataset when any stored latent (mean, std or the stored value) is NaN or infinite.",
)
def latents_are_finite(context: AssetCheckExecutionContext, settings: ImagenetInt8Settings):
    results = {}
    for key in context.partition_keys:
        ids, arrays, _ = read_latents(settings.output_path, key)
        bad = non_finite_count(*arrays.values())
        description = (
            "all latents are finite"
            if not bad
            else f"{bad} non-finite latent value(s): re-materialize vae_latents for this class (in fp32) before "
            "building the dataset"
        )
        results[key] = (not bad, description, {"images": len(ids), "non_finite": bad})
    yield from per_partition_results(context, results)
