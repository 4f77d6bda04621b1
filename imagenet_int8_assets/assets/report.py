"""reconstruction_report: what the latents lost, against the crops and through the uint8 codes."""

import importlib.metadata
import json

import numpy as np
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from imagenet_int8_assets.assets.disk_space import SpaceNeeds
from imagenet_int8_assets.assets.manifest import dataset_classes
from imagenet_int8_assets.assets.metadata import progress_logger
from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.crops.crop_store import CropVerificationError
from imagenet_int8_assets.core.quality.metrics import lpips_available
from imagenet_int8_assets.core.common.plotting import markdown_image
from imagenet_int8_assets.core.quality.reconstruct import choose_samples, decode_images, reconstruction_rows
from imagenet_int8_assets.core.quality.reconstruction_report import (
    ClassSamples,
    GridPlan,
    ReportCache,
    assemble_report,
    class_cache_key,
    quality_problems,
    read_summary,
)
from imagenet_int8_assets.core.common.layout import MissingArtifact, mds_root, report_dir, stats_path
from imagenet_int8_assets.core.crops.crop_store import read_crops
from imagenet_int8_assets.core.latents.latent_store import read_latents
from imagenet_int8_assets.resources import ImagenetInt8Settings

GROUP = "quality"


@asset(
    name="reconstruction_report",
    group_name=GROUP,
    deps=["mds_dataset", "quantization_stats"],
    kinds={"html"},
    description=(
        "For a seeded sample of images per class, decodes the float latent and the uint8 code "
        "read back from the dataset and compares both with the original crop (PSNR, SSIM, the "
        "int8-vs-float gap; LPIPS when its weights are available locally). Writes a grid image "
        "(original | from float | from uint8), per-channel histograms with the clip bounds, "
        "quantization error bars, and a self-contained HTML report under `<output>/report/`. "
        "Each class's results are cached in `<output>/report/cache/`: a class whose inputs did not "
        "change is not decoded again."
    ),
)
def reconstruction_report(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
    from imagenet_int8_assets.core.latents.vae import resolve_device

    settings.require_recorded_settings_or_fail()
    classes = dataset_classes(context.instance, settings)
    keys, vanished = classes.in_dataset, set(classes.vanished)
    root = mds_root(settings.output_path)
    build = mds_index.published_record(root)
    if build is None:
        raise MissingArtifact(f"No published dataset at {root}: materialize 'mds_dataset' first.")
    value_range = float(build["quant_range"])
    device = resolve_device(settings.device)
    decoder = _Decoder(root, build, device)
    published = build["per_class"]
    folder = report_dir(settings.output_path)
    cache = ReportCache(folder)
    plan = GridPlan(settings.report_per_class, settings.report_grid_images)
    key_inputs = {
        "vae": build["vae"], "value_range": value_range, "seed": settings.seed, "per_class": settings.report_per_class,
        "device_type": device.partition(":")[0], "torch_version": importlib.metadata.version("torch"),
    }

    samples, skipped, reused, decoded, writable = [], {}, [], [], True
    # one line every 10 s and at the end, not one per class (at ImageNet size a log event per class
    # is about 10 s of a build's SQLite writes, after the last encode)
    progress = progress_logger(context.log.info, "classes reported", total=len(keys))
    for done, key in enumerate(keys, 1):
        progress(done - 1)
        if key not in published:  # not published yet (automation may run the report on a new stats
            # materialization before mds_dataset publishes the class)
            skipped[key] = f"not in the published dataset yet: {_advice(root, key)}"
            continue
        count = published[key]
        pick = choose_samples(count, settings.report_per_class, settings.seed, key)
        key_of_class = class_cache_key(settings.output_path, key, pick, version=build["versions"][key], **key_inputs)
        if count:
            entry = cache.load(key_of_class, len(pick), plan.needed(len(pick)))
            if entry is not None:
                plan.add(len(pick))
                samples.append(entry)
                reused.append(key)
                continue
        result = _decode_class(settings, decoder, key, count, key in vanished, build["versions"][key])
        if isinstance(result, str):
            skipped[key] = result
            continue
        if result is None:  # a class without images
            continue
        result = result.keep_first(plan.add(len(result.rows)))
        writable = writable and _cached(context, cache, key_of_class, result)
        samples.append(result)
        decoded.append(key)
    progress(len(keys))
    decoder.close()
    _log_skipped(context, skipped)
    if not any(s.rows for s in samples):
        if skipped:
            key, reason = next(iter(skipped.items()))
            raise MissingArtifact(f"Nothing to report on: {len(skipped)} class(es) left out, e.g. {key}: {reason}.")
        raise MissingArtifact("The dataset has no images to report on.")

    stats = json.loads(stats_path(settings.output_path).read_text(encoding="utf-8"))
    lpips_ok, lpips_note = lpips_available()
    report = assemble_report(
        samples, [s.channel_values for s in samples], stats, value_range, build["vae"]["requested"], lpips_note,
        per_class=settings.report_per_class, max_grid_images=settings.report_grid_images,
    )
    overall, images = report.overall, report.images
    space = SpaceNeeds("reconstruction_report", settings.output_path)
    space.writing(1, report.size())
    with space.guard():
        report.write(folder, cached=[s.name for s in samples])
    context.log.info(
        f"{len(decoded)} class(es) decoded, {len(reused)} reused from the report's cache ({cache.folder})"
    )
    return MaterializeResult(
        metadata={
            "report": MetadataValue.path(str(folder / "report.html")),
            "images": overall["images"],
            "psnr_float": overall["psnr_float"],
            "psnr_uint8": overall["psnr_uint8"],
            "psnr_gap_db": overall["psnr_gap"],
            "ssim_float": overall["ssim_float"],
            "ssim_uint8": overall["ssim_uint8"],
            "lpips": lpips_note if not lpips_ok else "computed",
            "classes_decoded": len(decoded),
            "classes_reused": len(reused),
            **({"skipped_classes": MetadataValue.json(skipped)} if skipped else {}),
            "overall": MetadataValue.md(report.tables["overall"]),
            "per_class": MetadataValue.md(report.tables["per_class"]),
            "grid": MetadataValue.md(markdown_image(images["grid"], "original | from float | from uint8")),
            "histograms": MetadataValue.md(markdown_image(images["histograms"], "latent histograms")),
            "quantization_error": MetadataValue.md(
                markdown_image(images["quant_rmse"], "quantization RMSE") + "\n\n"
                + markdown_image(images["clip_fraction"], "clip fraction")
            ),
        }
    )


class _Decoder:
    """The VAE that built the dataset and the published dataset, opened when the first class is
    decoded: a report whose classes all come from the cache loads neither."""

    def __init__(self, root, build: dict, device: str):
        self.root, self.build, self.device = root, build, device
        self.vae = self.dataset = self.offsets = None

    def open(self) -> None:
        from imagenet_int8_assets.core.latents.vae import load_vae_as_recorded
        from imagenet_int8_assets.reader import open_dataset

        if self.vae is not None:
            return
        published = self.build["per_class"]  # the published index lists its classes in this order
        dataset = open_dataset(self.root)
        if int(dataset.num_samples) != sum(published.values()):
            raise Failure(
                description=(
                    f"The dataset at {self.root} was republished while the report opened it ({dataset.num_samples} "
                    f"samples in its index, {sum(published.values())} in build.json): materialize "
                    "reconstruction_report again."
                )
            )
        self.dataset = dataset
        self.offsets = dict(zip(published, np.cumsum([0, *published.values()])[:-1].tolist()))
        self.vae = load_vae_as_recorded(self.build["vae"]).to(self.device)

    def codes(self, key: str, pick) -> np.ndarray:
        """The uint8 codes of samples ``pick`` of class ``key`` as the dataset reads them back (dequantized)."""
        return np.stack([self.dataset[self.offsets[key] + int(i)]["latent"] for i in pick])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return decode_images(self.vae, latents, self.device)

    def close(self) -> None:
        self.dataset = None


def _decode_class(
    settings: ImagenetInt8Settings, decoder: _Decoder, key: str, count: int, vanished: bool, published_version: str
):
    """Class ``key``'s results (``ClassSamples`` with every image), or why it is left out of the
    report (a str), or None for a class without images."""
    root = mds_root(settings.output_path)
    ids, arrays, _ = read_latents(settings.output_path, key)
    if len(ids) != count:
        return (
            f"its latents ({len(ids)}) differ from its {count} published samples (rebuilt since the dataset was "
            f"published): {_advice(root, key, len(ids))}"
        )
    if _current_version(root, key) != published_version:
        # re-made since the dataset was published with as many images: its latents are not the ones
        # the published codes were quantized from, so no comparison would mean anything
        return f"rebuilt since the dataset was published: {_advice(root, key)}"
    if not ids:
        return None
    pick = choose_samples(len(ids), settings.report_per_class, settings.seed, key)
    _, crops = read_crops(settings.output_path, key, mmap=True)
    try:  # crops kept as 'none' (or 'png') are recomputed (decoded) and verified here
        originals = np.asarray(crops[pick])
    except CropVerificationError as exc:
        if vanished and exc.source_missing:
            # a class whose folder vanished stays in the dataset, but crops kept as 'none' cannot be
            # recomputed without its files: report on the other classes
            return (
                "its class folder vanished from the source and its crops were not stored (IMAGENET_INT8_CROP_STORAGE="
                "none): put the folder back to report on it, or delete its partition to drop the class"
            )
        raise Failure(description=str(exc), allow_retries=False) from None
    decoder.open()
    z_float = arrays["latent"][pick]
    from_float = decoder.decode(z_float)
    from_uint8 = decoder.decode(decoder.codes(key, pick))
    rows = [
        {"class": key, "id": ids[int(i)], **metrics}
        for i, metrics in zip(pick, reconstruction_rows(originals, from_float, from_uint8))
    ]
    channel_values = np.moveaxis(z_float, 1, 0).reshape(z_float.shape[1], -1)
    return ClassSamples(key, originals, from_float, from_uint8, rows, channel_values)


def _current_version(root, key: str) -> str | None:
    """The class's current MDS version as the published record names versions, or None."""
    try:
        return mds_index.current_version_dir(root, key).relative_to(root).as_posix()
    except FileNotFoundError:
        return None


def _advice(root, key: str, latents: int | None = None) -> str:
    """What brings class ``key`` into the report: its current MDS version published by mds_dataset,
    after its partition is built (it has no current version) or its shards rebuilt (the current
    version does not hold its ``latents`` yet). `imagenet-int8 build` does whichever is needed."""
    try:
        built = mds_index.index_sample_count(mds_index.read_index(mds_index.current_version_dir(root, key)))
    except (OSError, ValueError, KeyError):
        built = None
    if built is None:
        steps = f"preprocessed_crops, vae_latents and mds_shards for class {key!r}, then mds_dataset"
    elif latents is not None and built != latents:
        steps = f"mds_shards for class {key!r}, then mds_dataset"
    else:
        steps = "mds_dataset"
    return f"run `imagenet-int8 build`, or materialize {steps}, then reconstruction_report"


def _cached(context: AssetExecutionContext, cache: ReportCache, key: dict, samples: ClassSamples) -> bool:
    """Store a decoded class in the report's cache (False when it cannot be written: a full or
    read-only disk costs only the decode next time, so the report goes on and stops trying)."""
    try:
        cache.save(key, samples)
        return True
    except OSError as exc:
        context.log.warning(
            f"Could not write the report's cache ({exc}): this report stops caching and the next one decodes those "
            f"classes again. Make {cache.folder} writable (free space on its disk)."
        )
        return False


def _log_skipped(context: AssetExecutionContext, skipped: dict[str, str], limit: int = 20) -> None:
    """The classes left out of the report, at INFO: the reasons are ordinary (not yet published,
    rebuilt since), each says what brings the class in, and the metadata lists every one."""
    for key, reason in list(skipped.items())[:limit]:
        context.log.info(f"{key}: not in the report: {reason}")
    if len(skipped) > limit:
        context.log.info(f"... and {len(skipped) - limit} more class(es) not in the report (metadata: skipped_classes)")


@asset_check(
    asset=reconstruction_report,
    blocking=True,
    description=(
        "Thresholds on what quantization costs: the mean PSNR gap of uint8 vs float latents "
        "(IMAGENET_INT8_REPORT_MAX_PSNR_GAP dB) and the fraction of latent values clipped "
        "(IMAGENET_INT8_REPORT_MAX_CLIP_FRACTION). A warning by default; an error that blocks "
        "downstream steps with IMAGENET_INT8_REPORT_BLOCKING=true."
    ),
)
def reconstruction_quality(context: AssetCheckExecutionContext, settings: ImagenetInt8Settings) -> AssetCheckResult:
    summary = read_summary(report_dir(settings.output_path))
    problems = quality_problems(summary, settings.report_max_psnr_gap, settings.report_max_clip_fraction)
    return AssetCheckResult(
        passed=not problems,
        severity=AssetCheckSeverity.ERROR if settings.report_blocking else AssetCheckSeverity.WARN,
        description="; ".join(problems) or "quantization costs are within the thresholds",
        metadata={
            "psnr_gap_db": summary["psnr_gap"],
            "clip_fraction": summary["clip_fraction"],
            "max_psnr_gap_db": settings.report_max_psnr_gap,
            "max_clip_fraction": settings.report_max_clip_fraction,
        },
    )

