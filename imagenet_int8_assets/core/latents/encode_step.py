"""The encode stage: a step's classes encoded by the VAE on one leased device and written, either
from the crops ``preprocessed_crops`` stored (read, or recomputed and verified against their
hashes) or cropped from the source on the way (the crops written class by class as well).

``encode_classes`` is what the ``vae_latents`` asset and the benchmark's reference build call: it
returns each class's record (``EncodeResult.classes``, plain values) for the asset to turn into
metadata, logs through plain callables, and raises ``CropsChanged`` when a stored crop no longer
matches its source (the asset fails the step without a retry).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagenet_int8_assets.core.common.files import bytes_per_image, folder_bytes
from imagenet_int8_assets.core.crops.preprocess import crop_tasks
from imagenet_int8_assets.core.latents.encode import (
    encode_posterior,
    encode_record,
    non_finite_count,
    precision_error,
    select_latent,
    to_model_input,
)
from imagenet_int8_assets.core.latents.latent_store import latents_to_store, write_latents
from imagenet_int8_assets.core.latents.quantize import resolve_range
from imagenet_int8_assets.core.source.images import DEFAULT_MAX_PIXELS

FALLBACK_BANNER = (
    "!!! VAE FALLBACK: real weights for {requested!r} could not be loaded, so this run encodes "
    "with {source!r} RANDOM WEIGHTS. The latents are NOT meaningful; use them only to try the "
    "pipeline. Reason: {reason}"
)

# the fields of a class's record that are JSON documents (the others are numbers and strings;
# "path" is the latents' folder)
JSON_FIELDS = frozenset(
    {"batch_size_choice", "encode", "out_of_memory_retries", "pipeline", "precision_vs_fp32", "equivariance_error"}
)


def _ignore(*_args) -> None:
    return None


@dataclass(frozen=True)
class EncodeConfig:
    """The settings the encode stage reads (``ImagenetInt8Settings`` fields of the same names)."""

    output: Path
    precision: str = "fp32"
    batch_size: int = 0  # 0: the largest that fits, probed once per device and model
    workers: int = 1
    store_flip: bool = False
    latent_value: str = "sample"
    seed: int = 0
    latent_storage: str = "full"
    quant_range: float = 0.0  # > 0 overrides the VAE's default
    vae_fallback: str = ""
    crop_recipe: str = "imagenet.int8"
    crop_size: int = 256
    max_pixels: int = DEFAULT_MAX_PIXELS
    devices: str | None = None
    device: str = "auto"
    device_wait: float = 0.0


@dataclass(frozen=True)
class CropSource:
    """Classes to crop from the source while they are encoded: each class's good manifest rows
    (``{class: rows}``, with an ``id`` column) and the folder the ids are relative to."""

    rows: dict
    root: Path


@dataclass
class EncodeResult:
    """What the stage wrote: ``classes`` maps each class to its record (latents folder under "path",
    counts, provenance, timing, statistics; ``JSON_FIELDS`` hold documents), in writing order."""

    written: int = 0
    classes: dict[str, dict] = field(default_factory=dict)
    device: str = ""
    run_checks: dict | None = None


class CropsChanged(Exception):
    """A stored crop (kept as a hash, or as a PNG) no longer matches what was recorded: the message
    names the files and what to re-materialize."""


@dataclass
class _Hooks:
    info: Callable[[str], None]
    warning: Callable[[str], None]
    progress: Callable[[str, int], Callable[..., None]]
    space: Callable[[int], object] | None


def encode_classes(
    config: EncodeConfig,
    keys: list[str],
    load_vae: Callable[[], tuple[object, str]],
    *,
    purpose: str = "",
    crop_source: CropSource | None = None,
    crop_writer=None,
    space: Callable[[int], object] | None = None,
    info: Callable[[str], None] = _ignore,
    warning: Callable[[str], None] = _ignore,
    progress: Callable[[str, int], Callable[..., None]] | None = None,
) -> EncodeResult:
    """Encode ``keys`` on a device leased under the output (``purpose`` names the holder).

    ``load_vae()`` returns the model and how long loading took, as the log says it; it is called
    before the lease, so a run waiting for a device starts encoding the moment it gets one. With
    ``crop_source`` the classes are cropped from the source while the VAE encodes, and
    ``crop_writer.write(key, ids, images, failed)`` writes each class's crops as soon as it is
    encoded (``crop_writer.summary(n)`` is logged after); else the stored crops are read.
    ``space(total_images)`` returns the disk-space guard of the writes (``writing(images, bytes,
    key)`` and ``guard()``, as ``SpaceNeeds``); ``progress(label, total)`` a ``progress(done)``
    callback. Raises ``DeviceSettingError`` / ``DeviceLeaseTimeout`` from choosing and leasing the
    device and ``CropsChanged`` when a stored crop no longer matches.
    """
    from imagenet_int8_assets.core.latents.devices import lease_device, visible_devices

    hooks = _Hooks(info, warning, progress or (lambda label, total: _ignore), space)
    devices = visible_devices(config.devices or None, config.device)
    vae, loaded = load_vae()
    with lease_device(config.output, devices, timeout_s=config.device_wait, purpose=purpose, log=info) as leased:
        encoding = _Encoding(config, keys, hooks, leased, vae, loaded)
        if crop_source is not None:
            _crop_and_encode(encoding, crop_source, crop_writer)
        else:
            _encode_stored_crops(encoding)
    return encoding.result


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


def _stream(encoding: "_Encoding", keys, tasks, sizes, keep_crops, on_class, image_hw: tuple[int, int] | None = None):
    """Crop ``tasks`` (``sizes`` per class of ``keys``) on the worker processes while the VAE
    encodes them (core.latents.pipeline); ``keep_crops(group, rows, crops)`` sees every chunk of good crops
    first, ``on_class(key, group_result, seconds)`` each class as soon as it is encoded (after the
    run's numerics report, made on the first crops). ``image_hw``: the crop size, for classes
    without images when no class has any. Returns the stream's timing."""
    from imagenet_int8_assets.core.latents.pipeline import encode_stream

    config, hooks = encoding.config, encoding.hooks
    samples: list = []
    sampled: list[int] = []  # the group the samples come from: the first with good crops
    offsets = np.cumsum([0, *sizes[:-1]]).tolist()
    progress = hooks.progress(f"cropped and encoded ({len(keys)} class(es))", sum(sizes))
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
        encoding.vae, tasks, encoding.device, batch_size=encoding.batch_size, precision=config.precision,
        workers=config.workers, flip=config.store_flip, groups=sizes, keep_crops=kept,
        log=hooks.warning, progress=lambda group, n: progress(offsets[group] + n), on_group=done,
        image_hw=image_hw,
    )
    timing = result.timing.as_dict()
    hooks.info(f"crops of {len(keys)} class(es) streamed into the encoder: {timing}")
    return timing


def _crop_and_encode(encoding: "_Encoding", source: CropSource, writer) -> None:
    """``preprocessed_crops`` and ``vae_latents`` in one pass: the workers crop each class from the
    source while the VAE encodes, and each class's crops (as the crop storage says: hashes, PNGs or
    arrays) and latents are written as soon as it is encoded. The same bytes as cropping first."""
    config, keys, size = encoding.config, encoding.keys, encoding.config.crop_size
    rows = [source.rows.pop(k) for k in keys]
    sizes = [len(r) for r in rows]
    tasks = [
        t for key_rows in rows
        for t in crop_tasks(source.root, key_rows["id"], config.crop_recipe, size, config.max_pixels)
    ]
    encoding.start_writing(sum(sizes))
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
        crop_meta = {"recipe": config.crop_recipe, "size": size}
        encoding.write(key, ids, result.posterior, result.flipped, seconds, crop_meta, streamed=True)

    timing = _stream(encoding, keys, tasks, sizes, keep, write, image_hw=(size, size))
    encoding.add_stream_timing(keys, timing)
    encoding.hooks.info(writer.summary(len(keys)))


def _encode_stored_crops(encoding: "_Encoding") -> None:
    """``vae_latents`` alone, from the crops ``preprocessed_crops`` stored: raw and PNG crops are
    read, crops kept as hashes only are recomputed by the workers while the VAE encodes, each
    checked against its recorded hash before it is encoded (a changed source file raises
    ``CropsChanged`` naming it and what to re-materialize)."""
    from imagenet_int8_assets.core.crops.crop_store import (
        PIXEL_HASH,
        CropArray,
        CropVerificationError,
        pixel_hash,
        read_crops_with_meta,
        source_root_of,
    )

    config, hooks, keys = encoding.config, encoding.hooks, encoding.keys
    crops = {  # raw crops are memory-mapped; png and none crops are computed per class below
        k: read_crops_with_meta(config.output, k, mmap=True, workers=config.workers) for k in keys
    }
    encoding.start_writing(sum(len(ids) for ids, _, _ in crops.values()))
    streamed = [
        k for k in keys
        if isinstance(crops[k][1], CropArray) and crops[k][2].get("storage") == "none" and len(crops[k][0])
    ]
    if streamed:
        tasks, sizes = [], []
        for key in streamed:
            ids, _, meta = crops[key]
            root = source_root_of(config.output, meta, None)
            max_pixels = int(meta.get("max_pixels", DEFAULT_MAX_PIXELS))
            tasks += crop_tasks(root, ids, meta["recipe"], int(meta["size"]), max_pixels)
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
            timing = _stream(encoding, streamed, tasks, sizes, verify, write)
        except CropVerificationError as exc:
            raise CropsChanged(str(exc)) from None
        encoding.add_stream_timing(streamed, timing)
    rest = [k for k in keys if k not in streamed]
    progress = hooks.progress(f"encoded ({len(rest)} class(es))", sum(len(crops[k][0]) for k in rest))
    encoded = 0
    for key in rest:
        ids, images, crop_meta = crops.pop(key)
        if isinstance(images, CropArray):  # png and none crops: computed and verified here
            try:
                images = images.load()
            except CropVerificationError as exc:
                raise CropsChanged(str(exc)) from None
        if encoding.run_checks is None and len(ids):
            encoding.numerics(images[:8])
        t0 = time.monotonic()
        post = encode_posterior(
            encoding.vae, images, encoding.device, encoding.batch_size, config.precision,
            progress=lambda done, offset=encoded: progress(offset + done), log=hooks.warning,
        )
        encoded += len(ids)
        flipped = (
            encode_posterior(
                encoding.vae, images, encoding.device, encoding.batch_size, config.precision, flip=True,
                log=hooks.warning,
            )
            if config.store_flip
            else None
        )
        encoding.write(key, ids, post, flipped, time.monotonic() - t0, crop_meta, streamed=False)


def _batch_size_and_flops(config: EncodeConfig, hooks: _Hooks, vae, device: str) -> tuple[int, dict, int | None]:
    """The forward batch (0 = the largest that fits, probed once per device and model, cached under
    the output) and the encoder's FLOPs per image (None when they cannot be counted)."""
    from imagenet_int8_assets.core.latents.batch_size import encoder_flops, resolve_batch_size

    choice = resolve_batch_size(
        "auto" if config.batch_size == 0 else config.batch_size,
        vae, device, config.precision, config.crop_size, config.output, log=hooks.info,
    )
    try:
        flops = encoder_flops(vae, config.crop_size, config.output)
    except Exception as exc:  # a model the meta-device counter cannot trace: no TFLOP/s figure
        hooks.warning(f"encoder FLOPs not counted ({type(exc).__name__}: {exc}); no TFLOP/s in the metadata")
        flops = None
    return choice.batch_size, choice.as_metadata(), flops


class _Encoding:
    """One step's encoder: the VAE (loaded once; ``loaded`` says how long it took) moved to the leased device, its
    batch size and FLOPs, the provenance every class records; ``write`` stores a class's latents
    and records them in ``result``."""

    def __init__(self, config: EncodeConfig, keys: list[str], hooks: _Hooks, leased: str, vae, loaded: str):
        from imagenet_int8_assets.core.latents.devices import select_device

        self.config, self.keys, self.hooks, self.leased = config, list(keys), hooks, leased
        self.device = select_device(leased)
        started = time.monotonic()
        self.vae = vae.to(self.device)
        info = self.info = self.vae.info
        to_device_s = time.monotonic() - started
        self.batch_size, self.batch_choice, self.flops = _batch_size_and_flops(config, hooks, self.vae, self.device)
        self.banner = (
            FALLBACK_BANNER.format(requested=info.requested, source=config.vae_fallback, reason=info.fallback_reason)
            if info.is_fallback
            else None
        )
        if self.banner:
            hooks.warning(self.banner)
        hooks.info(
            f"Loaded VAE {info.requested!r} ({info.source}, {info.family}) {loaded}, on {self.device} in "
            f"{to_device_s:.1f}s, for "
            f"{len(self.keys)} partition(s), precision {config.precision}, device {leased}, "
            f"{self.batch_size} images per pass ({self.batch_choice.get('source', 'setting')})"
        )
        # the range the numerics report measures in (code steps); the codes' range is decided by the
        # steps that make codes (quantize.codes_range), so the latents do not depend on it
        self.value_range = resolve_range(config.quant_range, info.quant_range)
        self.provenance = {
            "vae": info.as_dict(),
            "device": self.device,
            "precision": config.precision,
            "latent_value": config.latent_value if info.has_posterior else "latent (no posterior)",
            "seed": config.seed,
            "store_flip": config.store_flip,
            "encode": encode_record(self.device, self.batch_size),
        }
        self.result = EncodeResult(device=self.device)
        self.space = None

    @property
    def run_checks(self) -> dict | None:
        """The numerics report, made once on the run's first crops."""
        return self.result.run_checks

    def start_writing(self, total_images: int) -> None:
        self.space = self.hooks.space(total_images) if self.hooks.space is not None else None

    def numerics(self, images: np.ndarray) -> None:
        self.result.run_checks = _numerics_report(
            self.vae, images, self.device, self.config.precision, self.value_range
        )
        for name, value in self.result.run_checks.items():
            self.hooks.info(f"{name}: {value}")

    def add_stream_timing(self, keys, timing: dict) -> None:
        """The stream's timing goes into the records of the classes it encoded."""
        for key in keys:
            self.result.classes[key]["pipeline"] = timing

    def write(self, key: str, ids: list[str], post, flipped, seconds: float, crop_meta: dict, streamed: bool) -> None:
        from imagenet_int8_assets.core.latents.batch_size import tflops

        config, info, provenance = self.config, self.info, self.provenance
        oom = post.oom_report()
        arrays = {"mean": post.mean, "latent": select_latent(post.mean, post.std, ids, config.latent_value, config.seed)}
        if post.std is not None:
            arrays["std"] = post.std
        redone = post.reencoded_fp32
        if flipped is not None:
            oom = oom or flipped.oom_report()
            flip_ids = [f"{i}#hflip" for i in ids]
            arrays["latent_flip"] = select_latent(flipped.mean, flipped.std, flip_ids, config.latent_value, config.seed)
            redone += flipped.reencoded_fp32
        arrays = latents_to_store(arrays, config.latent_storage)
        bad = non_finite_count(*arrays.values())
        meta = {**provenance, "crops": {"recipe": crop_meta["recipe"], "size": crop_meta["size"]}}
        guard = nullcontext()
        if self.space is not None:
            self.space.writing(len(ids), sum(a.nbytes for a in arrays.values()), key)
            guard = self.space.guard()
        with guard:
            folder = write_latents(config.output, key, ids, arrays, meta, storage=config.latent_storage)
        on_disk = folder_bytes(folder)
        latent = arrays["latent"]
        finite = latent[np.isfinite(latent)]
        flops = self.flops
        # random fallback weights: vae_fallback says so per class; the full banner is logged once per run
        # and stands once in mds_dataset's metadata (not repeated in every class's)
        self.result.classes[key] = {
            "path": str(folder),
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
            "batch_size_choice": self.batch_choice,
            "precision": config.precision,
            "encode_batch_size": provenance["encode"]["batch_size"],
            "encode": provenance["encode"],
            "reencoded_in_fp32": redone,
            **({"out_of_memory_retries": oom} if oom else {}),
            "stored_flip": config.store_flip,
            "crops_streamed": streamed,
            "latent_storage": config.latent_storage,
            "bytes": on_disk,
            "bytes_per_image": bytes_per_image(on_disk, len(ids)),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(ids) / seconds, 3) if seconds > 0 and ids else 0.0,
            **(
                {
                    "encoder_gflops_per_image": round(flops / 1e9, 3),
                    "tflops": round(tflops(len(ids) / seconds, flops, 2 if config.store_flip else 1), 6),
                }
                if flops and seconds > 0 and ids
                else {}
            ),
            "non_finite_values": bad,
            "latent_mean": float(finite.mean()) if finite.size else float("nan"),
            "latent_std": float(finite.std()) if finite.size else float("nan"),
            "latent_min": float(finite.min()) if finite.size else float("nan"),
            "latent_max": float(finite.max()) if finite.size else float("nan"),
            **dict(self.result.run_checks or {}),
        }
        self.result.written += len(ids)
