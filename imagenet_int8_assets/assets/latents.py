"""vae_latents: the crops encoded by the VAE, plus the blocking check that they are finite."""


import time

import numpy as np
from dagster import (
    Failure,
    AssetCheckExecutionContext,
    AssetExecutionContext,
    BackfillPolicy,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from imagenet_int8_assets.assets.crops import crop_pixels_or_fail, preprocessed_crops
from imagenet_int8_assets.assets.disk_space import SpaceNeeds
from imagenet_int8_assets.assets.metadata import GROUP, PartitionMetadata, progress_logger
from imagenet_int8_assets.assets.partition_checks import per_partition_results
from imagenet_int8_assets.core.encode import (
    encode_posterior,
    encode_record,
    non_finite_count,
    precision_error,
    select_latent,
    to_model_input,
)
from imagenet_int8_assets.core.storage import (
    bytes_per_image,
    folder_bytes,
    latents_to_store,
    read_crops_with_meta,
    read_latents,
    write_latents,
)
from imagenet_int8_assets.core.vae import load_vae
from imagenet_int8_assets.partitions import class_partitions
from imagenet_int8_assets.resources import (
    DEFAULT_MAX_PARTITIONS_PER_RUN,
    ImagenetInt8Settings,
)

FALLBACK_BANNER = (
    "!!! VAE FALLBACK: real weights for {requested!r} could not be loaded, so this run encodes "
    "with {source!r} RANDOM WEIGHTS. The latents are NOT meaningful; use them only to try the "
    "pipeline. Reason: {reason}"
)


def _numerics_report(vae, images: np.ndarray, device: str, precision: str, value_range: float) -> dict:
    """Once per run, on up to 4 crops: lower precisions against fp32; Aura's equivariance error.

    On a GPU both bf16 and fp16 are compared; on the CPU (where they are slow and rarely used)
    only the configured precision, if it is not fp32.
    """
    from imagenet_int8_assets.core.encode import PRECISIONS

    compared = [p for p in PRECISIONS if p != "fp32" and (device.startswith("cuda") or p == precision)]
    report = {}
    if compared:
        report["precision_vs_fp32"] = {p: precision_error(vae, images[:4], device, p, value_range) for p in compared}
    if vae.info.family == "aura":
        import torch

        from imagenet_int8_assets.core.aura_latents import equivariance_error

        x = to_model_input(images, device)
        with torch.inference_mode():
            report["equivariance_error"] = equivariance_error(lambda t: vae.encode(t)[0], x, value_range=value_range)
    return report


@asset(
    name="vae_latents",
    group_name=GROUP,
    partitions_def=class_partitions,
    backfill_policy=BackfillPolicy.multi_run(DEFAULT_MAX_PARTITIONS_PER_RUN),
    deps=[preprocessed_crops],
    pool="gpu",
    kinds={"pytorch"},
    description=(
        "The crops of one class encoded by the VAE (GPU when there is one, fp32). Stores the "
        "latent that goes into the dataset ('sample': mean + std * noise seeded by the run seed "
        "and the image id, so rebuilds give the same bytes; or 'mean') as float32, and with "
        "IMAGENET_INT8_LATENT_STORAGE=full (default) the posterior mean and std too, in "
        "latents/<class>/latents.npz. A batched run loads the model once for all its partitions."
    ),
)
def vae_latents(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
    settings.require_recorded_settings_or_fail()
    from imagenet_int8_assets.core.devices import DeviceLeaseTimeout, DeviceSettingError, lease_device, visible_devices

    # one device per run that encodes: N devices, N runs at once (the gpu pool's limit); only
    # choosing and leasing the device raise these two errors
    try:
        devices = visible_devices(settings.devices or None, settings.device)
        with lease_device(
            settings.output_path, devices, timeout_s=settings.device_wait, purpose=context.run_id, log=context.log.info
        ) as leased:
            return _encode_partitions(context, settings, leased)
    except (DeviceSettingError, DeviceLeaseTimeout) as exc:
        raise Failure(description=str(exc), allow_retries=isinstance(exc, DeviceLeaseTimeout)) from None


def _stream_classes(context, settings: ImagenetInt8Settings, vae, device: str, batch_size: int, crops: dict):
    """Encode the classes whose crops are kept as hashes only (IMAGENET_INT8_CROP_STORAGE=none) in
    one overlapped stream: worker processes crop from the source while the VAE encodes, and every
    crop is checked against its recorded hash before it is encoded (a changed source file fails
    the step naming it). Returns ({class: (posterior, flipped, seconds)}, timing, sample crops)."""
    from imagenet_int8_assets.core.crop_store import (
        PIXEL_HASH,
        CropArray,
        CropVerificationError,
        pixel_hash,
        source_root_of,
    )
    from imagenet_int8_assets.core.images import DEFAULT_MAX_PIXELS
    from imagenet_int8_assets.core.pipeline import encode_stream

    keys = [
        k for k in context.partition_keys
        if isinstance(crops[k][1], CropArray) and crops[k][2].get("storage") == "none" and len(crops[k][0])
    ]
    if not keys:
        return {}, None, None
    tasks, sizes = [], []
    for key in keys:
        ids, _, meta = crops[key]
        root = source_root_of(settings.output_path, meta, None)
        max_pixels = int(meta.get("max_pixels", DEFAULT_MAX_PIXELS))
        tasks += [(str(root / i), meta["recipe"], int(meta["size"]), max_pixels) for i in ids]
        sizes.append(len(ids))
    samples: list = []

    def verify(group: int, rows: list[int], chunk) -> None:
        images, meta = crops[keys[group]][1], crops[keys[group]][2]
        hashes = meta.get(PIXEL_HASH)
        bad = [r for r, crop in zip(rows, chunk) if hashes is not None and pixel_hash(crop) != hashes[r]]
        if bad:
            images[bad]  # recomputes those rows and raises the error naming the files and what changed
            raise CropVerificationError(f"class {keys[group]!r}: crops of rows {bad[:5]} changed while being read", [])
        if group == 0 and len(samples) < 8:  # the numerics report looks at the first class, as unstreamed
            samples.extend(chunk[: 8 - len(samples)])

    offsets = np.cumsum([0, *sizes[:-1]]).tolist()
    progress = progress_logger(context.log.info, f"cropped and encoded ({len(keys)} class(es))", total=sum(sizes))
    started = time.monotonic()
    try:
        result = encode_stream(
            vae, tasks, device, batch_size=batch_size, precision=settings.precision, workers=settings.worker_count(),
            flip=settings.store_flip, groups=sizes, keep_crops=verify, log=context.log.warning,
            progress=lambda group, done: progress(offsets[group] + done),
        )
        for key, group in zip(keys, result.groups):
            if group.failed:  # cropped when recorded, not now: name the files and what changed
                crops[key][1][[row for row, _ in group.failed]]
                raise CropVerificationError(f"class {key!r}: {group.failed[0][1]}", [])
    except CropVerificationError as exc:
        raise Failure(description=str(exc), allow_retries=False) from None
    wall = time.monotonic() - started
    total = sum(sizes)
    streamed = {
        key: (group.posterior, group.flipped, wall * n / total) for key, group, n in zip(keys, result.groups, sizes)
    }
    timing = result.timing.as_dict()
    context.log.info(f"crops of {len(keys)} class(es) streamed into the encoder: {timing}")
    return streamed, {"classes": set(keys), "timing": timing}, np.stack(samples) if samples else None


def _batch_size_and_flops(context, settings: ImagenetInt8Settings, vae, device: str) -> tuple[int, dict, int | None]:
    """The forward batch (0 = the largest that fits, probed once per device and model, cached under
    the output) and the encoder's FLOPs per image (None when they cannot be counted)."""
    from imagenet_int8_assets.core.batch_size import encoder_flops, resolve_batch_size

    choice = resolve_batch_size(
        "auto" if settings.batch_size == 0 else settings.batch_size,
        vae, device, settings.precision, settings.crop_size, settings.output_path, log=context.log.info,
    )
    try:
        flops = encoder_flops(vae, settings.crop_size, settings.output_path)
    except Exception as exc:  # a model the meta-device counter cannot trace: no TFLOP/s figure
        context.log.warning(f"encoder FLOPs not counted ({type(exc).__name__}: {exc}); no TFLOP/s in the metadata")
        flops = None
    return choice.batch_size, choice.as_metadata(), flops


def _encode_partitions(context: AssetExecutionContext, settings: ImagenetInt8Settings, leased: str) -> MaterializeResult:
    from imagenet_int8_assets.core.batch_size import tflops
    from imagenet_int8_assets.core.devices import select_device

    device = select_device(leased)
    started = time.monotonic()
    vae = load_vae(settings.vae, fallback=settings.vae_fallback or None).to(device)
    info = vae.info
    load_s = time.monotonic() - started
    batch_size, batch_choice, flops = _batch_size_and_flops(context, settings, vae, device)
    banner = (
        FALLBACK_BANNER.format(requested=info.requested, source=settings.vae_fallback, reason=info.fallback_reason)
        if info.is_fallback
        else None
    )
    if banner:
        context.log.warning(banner)
    context.log.info(
        f"Loaded VAE {info.requested!r} ({info.source}, {info.family}) on {device} in {load_s:.1f}s for "
        f"{len(context.partition_keys)} partition(s), precision {settings.precision}, device {leased}, "
        f"{batch_size} images per pass ({batch_choice.get('source', 'setting')})"
    )
    value_range = settings.range_for(info.quant_range)
    provenance = {
        "vae": info.as_dict(),
        "device": device,
        "precision": settings.precision,
        "latent_value": settings.latent_value if info.has_posterior else "latent (no posterior)",
        "seed": settings.seed,
        "store_flip": settings.store_flip,
        "encode": encode_record(device, batch_size),
    }
    run_checks: dict = {}
    crops = {  # raw crops are memory-mapped; png and none crops are computed per class below
        k: read_crops_with_meta(settings.output_path, k, mmap=True, workers=settings.worker_count())
        for k in context.partition_keys
    }
    space = SpaceNeeds("vae_latents", settings.output_path, sum(len(ids) for ids, _, _ in crops.values()))
    # Crops kept as hashes only are recomputed from the source by CPU workers while the VAE encodes
    # (core.pipeline), and verified against their recorded hashes on the way.
    streamed, stream_timing, samples = _stream_classes(context, settings, vae, device, batch_size, crops)
    metadata_of = PartitionMetadata(context)
    unstreamed = [k for k in context.partition_keys if k not in streamed]
    progress = progress_logger(
        context.log.info, f"encoded ({len(unstreamed)} class(es))", total=sum(len(crops[k][0]) for k in unstreamed)
    )
    encoded = written = 0
    if samples is not None:
        run_checks = _numerics_report(vae, samples, device, settings.precision, value_range)
        for name, value in run_checks.items():
            context.log.info(f"{name}: {value}")
    for key in context.partition_keys:
        ids, images, crop_meta = crops.pop(key)
        if key in streamed:
            post, flipped, seconds = streamed.pop(key)
        else:
            images = crop_pixels_or_fail(images)
            if not run_checks and len(ids):
                run_checks = _numerics_report(vae, images[:8], device, settings.precision, value_range)
                for name, value in run_checks.items():
                    context.log.info(f"{name}: {value}")
            t0 = time.monotonic()
            post = encode_posterior(
                vae, images, device, batch_size, settings.precision, progress=lambda done, offset=encoded: progress(offset + done),
                log=context.log.warning,
            )
            encoded += len(ids)
            flipped = (
                encode_posterior(vae, images, device, batch_size, settings.precision, flip=True, log=context.log.warning)
                if settings.store_flip
                else None
            )
            seconds = time.monotonic() - t0
        oom = post.oom_report()
        arrays = {"mean": post.mean, "latent": select_latent(post.mean, post.std, ids, settings.latent_value, settings.seed)}
        if post.std is not None:
            arrays["std"] = post.std
        redone = post.reencoded_fp32
        if flipped is not None:
            oom = oom or flipped.oom_report()
            flip_ids = [f"{i}#hflip" for i in ids]
            arrays["latent_flip"] = select_latent(flipped.mean, flipped.std, flip_ids, settings.latent_value, settings.seed)
            redone += flipped.reencoded_fp32
        arrays = latents_to_store(arrays, settings.latent_storage)
        bad = non_finite_count(*arrays.values())
        meta = {**provenance, "crops": {"recipe": crop_meta["recipe"], "size": crop_meta["size"]}}
        space.writing(len(ids), sum(a.nbytes for a in arrays.values()), key)
        with space.guard():
            folder = write_latents(settings.output_path, key, ids, arrays, meta, storage=settings.latent_storage)
        on_disk = folder_bytes(folder)
        latent = arrays["latent"]
        finite = latent[np.isfinite(latent)]
        partition_metadata = {
            "path": MetadataValue.path(str(folder)),
            "images": len(ids),
            "latent_shape": str(tuple(latent.shape[1:])),
            "latent_value": provenance["latent_value"],
            "vae": info.requested,
            "vae_source": info.source,
            "vae_revision": info.revision or "",
            "vae_weights_sha256": info.weights_sha256 or "",
            "vae_fallback": bool(info.is_fallback),
            "device": device,
            "device_lease": leased,
            "batch_size_choice": MetadataValue.json(batch_choice),
            "precision": settings.precision,
            "encode_batch_size": provenance["encode"]["batch_size"],
            "encode": MetadataValue.json(provenance["encode"]),
            "reencoded_in_fp32": redone,
            **({"out_of_memory_retries": MetadataValue.json(oom)} if oom else {}),
            "stored_flip": settings.store_flip,
            "crops_streamed": stream_timing is not None and key in stream_timing["classes"],
            **({"pipeline": MetadataValue.json(stream_timing["timing"])} if stream_timing and key in stream_timing["classes"] else {}),
            "latent_storage": settings.latent_storage,
            "bytes": on_disk,
            "bytes_per_image": bytes_per_image(on_disk, len(ids)),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(ids) / seconds, 3) if seconds > 0 and ids else 0.0,
            **(
                {
                    "encoder_gflops_per_image": round(flops / 1e9, 3),
                    "tflops": round(tflops(len(ids) / seconds, flops, 2 if settings.store_flip else 1), 6),
                }
                if flops and seconds > 0 and ids
                else {}
            ),
            "non_finite_values": bad,
            "latent_mean": float(finite.mean()) if finite.size else float("nan"),
            "latent_std": float(finite.std()) if finite.size else float("nan"),
            "latent_min": float(finite.min()) if finite.size else float("nan"),
            "latent_max": float(finite.max()) if finite.size else float("nan"),
            **{k: MetadataValue.json(v) for k, v in run_checks.items()},
        }
        if banner:
            partition_metadata["WARNING"] = banner
        metadata_of.add(key, partition_metadata)
        written += len(ids)
    context.log.info(
        f"{written} latents of {len(context.partition_keys)} class(es) written; per class (path, bytes, timing) "
        "in the metadata"
    )
    return MaterializeResult()

@asset_check(
    asset=vae_latents,
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
