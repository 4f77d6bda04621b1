"""vae_latents: the crops encoded by the VAE (the asset itself is defined with preprocessed_crops
in crops_and_latents.py), plus the blocking check that they are finite."""


import time

import numpy as np
from dagster import AssetCheckExecutionContext, Failure, MetadataValue, asset_check

from imagenet_int8_assets.assets.crops import CropWriter, crop_pixels_or_fail, crop_tasks, manifest_rows
from imagenet_int8_assets.assets.disk_space import SpaceNeeds
from imagenet_int8_assets.assets.metadata import PartitionMetadata, progress_logger
from imagenet_int8_assets.assets.partition_checks import per_partition_results
from imagenet_int8_assets.core.latents.encode import (
    encode_posterior,
    encode_record,
    non_finite_count,
    precision_error,
    select_latent,
    to_model_input,
)
from imagenet_int8_assets.core.common.files import bytes_per_image, folder_bytes
from imagenet_int8_assets.core.latents.latent_store import latents_to_store, read_latents, write_latents
from imagenet_int8_assets.core.crops.crop_store import read_crops_with_meta
from imagenet_int8_assets.core.latents.vae import load_vae
from imagenet_int8_assets.partitions import class_partitions
from imagenet_int8_assets.resources import ImagenetInt8Settings

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
    from imagenet_int8_assets.core.latents.encode import PRECISIONS

    compared = [p for p in PRECISIONS if p != "fp32" and (device.startswith("cuda") or p == precision)]
    report = {}
    if compared:
        report["precision_vs_fp32"] = {p: precision_error(vae, images[:4], device, p, value_range) for p in compared}
    if vae.info.family == "aura":
        import torch

        from imagenet_int8_assets.core.latents.aura_latents import equivariance_error

        x = to_model_input(images, device)
        with torch.inference_mode():
            report["equivariance_error"] = equivariance_error(lambda t: vae.encode(t)[0], x, value_range=value_range)
    return report


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


def encode_classes(context, settings: ImagenetInt8Settings, crop_too: bool) -> None:
    """Encode the step's classes on a leased device: with ``crop_too`` cropping them from the
    source on the way (``preprocessed_crops`` in the same step, written class by class), else from
    the stored crops."""
    from imagenet_int8_assets.core.latents.devices import (
        DeviceLeaseTimeout,
        DeviceSettingError,
        lease_device,
        visible_devices,
    )

    # refusals (other settings, classes gone from the source) before a device or a model is touched
    source = None
    if crop_too:
        source = manifest_rows(context, settings)
    else:
        settings.require_recorded_settings_or_fail()

    # one device per run that encodes: N devices, N runs at once (the gpu pool's limit); only
    # choosing and leasing the device raise these two errors
    try:
        devices = visible_devices(settings.devices or None, settings.device)
        # the model is loaded (torch and diffusers imported, weights read) before the lease, so a run
        # waiting for a device starts encoding the moment it gets one; it goes to the device after
        vae, loaded = _load_vae(settings)
        with lease_device(
            settings.output_path, devices, timeout_s=settings.device_wait, purpose=context.run_id, log=context.log.info
        ) as leased:
            encoding = _Encoding(context, settings, leased, vae, loaded)
            if source is not None:
                _crop_and_encode(context, settings, encoding, *source)
            else:
                _encode_stored_crops(context, settings, encoding)
    except (DeviceSettingError, DeviceLeaseTimeout) as exc:
        raise Failure(description=str(exc), allow_retries=isinstance(exc, DeviceLeaseTimeout)) from None
    context.log.info(
        f"{encoding.written} latents of {len(context.partition_keys)} class(es) written; per class (path, bytes, "
        "timing) in the metadata"
    )


def _stream(
    context, settings: ImagenetInt8Settings, encoding: "_Encoding", keys, tasks, sizes, keep_crops, on_class,
    image_hw: tuple[int, int] | None = None,
):
    """Crop ``tasks`` (``sizes`` per class of ``keys``) on the worker processes while the VAE
    encodes them (core.latents.pipeline); ``keep_crops(group, rows, crops)`` sees every chunk of good crops
    first, ``on_class(key, group_result, seconds)`` each class as soon as it is encoded (after the
    run's numerics report, made on the first crops). ``image_hw``: the crop size, for classes
    without images when no class has any. Returns the stream's timing."""
    from imagenet_int8_assets.core.latents.pipeline import encode_stream

    samples: list = []
    sampled: list[int] = []  # the group the samples come from: the first with good crops
    offsets = np.cumsum([0, *sizes[:-1]]).tolist()
    progress = progress_logger(context.log.info, f"cropped and encoded ({len(keys)} class(es))", total=sum(sizes))
    last = time.monotonic()

    def kept(group: int, rows: list[int], chunk) -> None:  # the encoding thread
        if keep_crops is not None:
            keep_crops(group, rows, chunk)
        sampled[:] = sampled or [group]
        if group == sampled[0] and len(samples) < 8:  # the numerics report looks at the first crops, as unstreamed
            samples.extend(chunk[: 8 - len(samples)])

    def done(group: int, result) -> None:  # the writer thread (core.latents.pipeline), while the next class encodes
        nonlocal last
        now = time.monotonic()
        if samples and encoding.run_checks is None and group >= sampled[0]:
            encoding.numerics(np.stack(samples))
        on_class(keys[group], result, now - last)
        last = time.monotonic()

    result = encode_stream(
        encoding.vae, tasks, encoding.device, batch_size=encoding.batch_size, precision=settings.precision,
        workers=settings.worker_count(), flip=settings.store_flip, groups=sizes, keep_crops=kept,
        log=context.log.warning, progress=lambda group, n: progress(offsets[group] + n), on_group=done,
        image_hw=image_hw,
    )
    timing = result.timing.as_dict()
    context.log.info(f"crops of {len(keys)} class(es) streamed into the encoder: {timing}")
    return timing


def _crop_and_encode(context, settings: ImagenetInt8Settings, encoding: "_Encoding", by_class: dict, root) -> None:
    """``preprocessed_crops`` and ``vae_latents`` in one pass: the workers crop each class from the
    source while the VAE encodes, and each class's crops (as the crop storage says: hashes, PNGs or
    arrays) and latents are written as soon as it is encoded. The same bytes as cropping first."""
    keys = list(context.partition_keys)
    rows = [by_class.pop(k) for k in keys]
    sizes = [len(r) for r in rows]
    tasks = [t for key_rows in rows for t in crop_tasks(settings, root, key_rows)]
    writer = CropWriter(context, settings, root, sum(sizes))
    encoding.start_writing(sum(sizes))
    size = settings.crop_size
    held: dict = {}  # the classes cropped and not written yet: their good crops, in order

    def keep(group: int, indices: list[int], crops) -> None:
        if group not in held:  # popped by write (the writer thread) once the class is encoded
            held[group] = np.empty((sizes[group], size, size, 3), dtype=np.uint8)
        held[group][indices] = crops

    def write(key: str, result, seconds: float) -> None:
        group = keys.index(key)
        ids_all = list(rows[group]["id"])
        images = held.pop(group, np.empty((0, size, size, 3), dtype=np.uint8))
        ids = [ids_all[i] for i in result.ok]
        failed = [{"id": ids_all[i], "reason": reason} for i, reason in result.failed]
        writer.write(key, ids, images[result.ok], failed)
        crop_meta = {"recipe": settings.crop_recipe, "size": size}
        encoding.write(key, ids, result.posterior, result.flipped, seconds, crop_meta, streamed=True)

    timing = _stream(context, settings, encoding, keys, tasks, sizes, keep, write, image_hw=(size, size))
    encoding.add_stream_timing(keys, timing)
    context.log.info(writer.summary(len(keys)))


def _encode_stored_crops(context, settings: ImagenetInt8Settings, encoding: "_Encoding") -> None:
    """``vae_latents`` alone, from the crops ``preprocessed_crops`` stored: raw and PNG crops are
    read, crops kept as hashes only are recomputed by the workers while the VAE encodes, each
    checked against its recorded hash before it is encoded (a changed source file fails the step
    naming it and what to re-materialize)."""
    from imagenet_int8_assets.core.crops.crop_store import (
        PIXEL_HASH,
        CropArray,
        CropVerificationError,
        pixel_hash,
        source_root_of,
    )
    from imagenet_int8_assets.core.source.images import DEFAULT_MAX_PIXELS

    crops = {  # raw crops are memory-mapped; png and none crops are computed per class below
        k: read_crops_with_meta(settings.output_path, k, mmap=True, workers=settings.worker_count())
        for k in context.partition_keys
    }
    encoding.start_writing(sum(len(ids) for ids, _, _ in crops.values()))
    streamed = [
        k for k in context.partition_keys
        if isinstance(crops[k][1], CropArray) and crops[k][2].get("storage") == "none" and len(crops[k][0])
    ]
    if streamed:
        tasks, sizes = [], []
        for key in streamed:
            ids, _, meta = crops[key]
            root = source_root_of(settings.output_path, meta, None)
            max_pixels = int(meta.get("max_pixels", DEFAULT_MAX_PIXELS))
            tasks += [(str(root / i), meta["recipe"], int(meta["size"]), max_pixels) for i in ids]
            sizes.append(len(ids))

        def verify(group: int, rows: list[int], chunk) -> None:
            images, meta = crops[streamed[group]][1], crops[streamed[group]][2]
            hashes = meta.get(PIXEL_HASH)
            bad = [r for r, crop in zip(rows, chunk) if hashes is not None and pixel_hash(crop) != hashes[r]]
            if bad:
                images[bad]  # recomputes those rows and raises the error naming the files and what changed
                raise CropVerificationError(
                    f"class {streamed[group]!r}: crops of rows {bad[:5]} changed while being read", []
                )

        def write(key: str, result, seconds: float) -> None:
            ids, images, meta = crops.pop(key)
            if result.failed:  # cropped when recorded, not now: name the files and what changed
                images[[row for row, _ in result.failed]]
                raise CropVerificationError(f"class {key!r}: {result.failed[0][1]}", [])
            encoding.write(key, ids, result.posterior, result.flipped, seconds, meta, streamed=True)

        try:
            timing = _stream(context, settings, encoding, streamed, tasks, sizes, verify, write)
        except CropVerificationError as exc:
            raise Failure(description=str(exc), allow_retries=False) from None
        encoding.add_stream_timing(streamed, timing)
    rest = [k for k in context.partition_keys if k not in streamed]
    progress = progress_logger(
        context.log.info, f"encoded ({len(rest)} class(es))", total=sum(len(crops[k][0]) for k in rest)
    )
    encoded = 0
    for key in rest:
        ids, images, crop_meta = crops.pop(key)
        images = crop_pixels_or_fail(images)
        if encoding.run_checks is None and len(ids):
            encoding.numerics(images[:8])
        t0 = time.monotonic()
        post = encode_posterior(
            encoding.vae, images, encoding.device, encoding.batch_size, settings.precision,
            progress=lambda done, offset=encoded: progress(offset + done), log=context.log.warning,
        )
        encoded += len(ids)
        flipped = (
            encode_posterior(
                encoding.vae, images, encoding.device, encoding.batch_size, settings.precision, flip=True,
                log=context.log.warning,
            )
            if settings.store_flip
            else None
        )
        encoding.write(key, ids, post, flipped, time.monotonic() - t0, crop_meta, streamed=False)


def _batch_size_and_flops(context, settings: ImagenetInt8Settings, vae, device: str) -> tuple[int, dict, int | None]:
    """The forward batch (0 = the largest that fits, probed once per device and model, cached under
    the output) and the encoder's FLOPs per image (None when they cannot be counted)."""
    from imagenet_int8_assets.core.latents.batch_size import encoder_flops, resolve_batch_size

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


class _Encoding:
    """One step's encoder: the VAE (loaded once; ``loaded`` says how long it took) moved to the leased device, its
    batch size and FLOPs, the provenance every class records; ``write`` stores a class's latents
    with their metadata."""

    def __init__(self, context, settings: ImagenetInt8Settings, leased: str, vae, loaded: str):
        from imagenet_int8_assets.core.latents.devices import select_device

        self.context, self.settings, self.leased = context, settings, leased
        self.device = select_device(leased)
        started = time.monotonic()
        self.vae = vae.to(self.device)
        info = self.info = self.vae.info
        to_device_s = time.monotonic() - started
        self.batch_size, self.batch_choice, self.flops = _batch_size_and_flops(context, settings, self.vae, self.device)
        self.banner = (
            FALLBACK_BANNER.format(requested=info.requested, source=settings.vae_fallback, reason=info.fallback_reason)
            if info.is_fallback
            else None
        )
        if self.banner:
            context.log.warning(self.banner)
        context.log.info(
            f"Loaded VAE {info.requested!r} ({info.source}, {info.family}) {loaded}, on {self.device} in "
            f"{to_device_s:.1f}s, for "
            f"{len(context.partition_keys)} partition(s), precision {settings.precision}, device {leased}, "
            f"{self.batch_size} images per pass ({self.batch_choice.get('source', 'setting')})"
        )
        self.value_range = settings.range_for(info.quant_range)
        self.provenance = {
            "vae": info.as_dict(),
            "device": self.device,
            "precision": settings.precision,
            "latent_value": settings.latent_value if info.has_posterior else "latent (no posterior)",
            "seed": settings.seed,
            "store_flip": settings.store_flip,
            "encode": encode_record(self.device, self.batch_size),
        }
        self.run_checks: dict | None = None  # the numerics report, made once on the run's first crops
        self.metadata = PartitionMetadata(context, "vae_latents")
        self.space: SpaceNeeds | None = None
        self.written = 0

    def start_writing(self, total_images: int) -> None:
        self.space = SpaceNeeds("vae_latents", self.settings.output_path, total_images)

    def numerics(self, images: np.ndarray) -> None:
        self.run_checks = _numerics_report(self.vae, images, self.device, self.settings.precision, self.value_range)
        for name, value in self.run_checks.items():
            self.context.log.info(f"{name}: {value}")

    def add_stream_timing(self, keys, timing: dict) -> None:
        """The stream's timing goes into the metadata of the classes it encoded (recorded at the end
        of the step, so it can be added after they were written)."""
        for key in keys:
            self.metadata.add(key, {"pipeline": MetadataValue.json(timing)})

    def write(self, key: str, ids: list[str], post, flipped, seconds: float, crop_meta: dict, streamed: bool) -> None:
        from imagenet_int8_assets.core.latents.batch_size import tflops

        settings, info, provenance = self.settings, self.info, self.provenance
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
        self.space.writing(len(ids), sum(a.nbytes for a in arrays.values()), key)
        with self.space.guard():
            folder = write_latents(settings.output_path, key, ids, arrays, meta, storage=settings.latent_storage)
        on_disk = folder_bytes(folder)
        latent = arrays["latent"]
        finite = latent[np.isfinite(latent)]
        flops = self.flops
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
            "device": self.device,
            "device_lease": self.leased,
            "batch_size_choice": MetadataValue.json(self.batch_choice),
            "precision": settings.precision,
            "encode_batch_size": provenance["encode"]["batch_size"],
            "encode": MetadataValue.json(provenance["encode"]),
            "reencoded_in_fp32": redone,
            **({"out_of_memory_retries": MetadataValue.json(oom)} if oom else {}),
            "stored_flip": settings.store_flip,
            "crops_streamed": streamed,
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
            **{k: MetadataValue.json(v) for k, v in (self.run_checks or {}).items()},
        }
        # random fallback weights: vae_fallback above says so per class; the full banner is logged once
        # per run and stands once in mds_dataset's metadata (not repeated in every class's)
        self.metadata.add(key, partition_metadata)
        self.written += len(ids)


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
