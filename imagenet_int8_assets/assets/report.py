"""reconstruction_report: what the latents lost, against the crops and through the uint8 codes."""

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
from imagenet_int8_assets.assets.metadata import progress_logger
from imagenet_int8_assets.assets.manifest import dataset_classes
from imagenet_int8_assets.core import mds_index
from imagenet_int8_assets.core.crop_store import CropVerificationError
from imagenet_int8_assets.core.metrics import lpips_available
from imagenet_int8_assets.core.plotting import markdown_image
from imagenet_int8_assets.core.reconstruct import (
    choose_samples,
    decode_images,
    reconstruction_rows,
)
from imagenet_int8_assets.core.reconstruction_report import (
    ClassSamples,
    assemble_report,
    quality_problems,
    read_summary,
)
from imagenet_int8_assets.core.storage import (
    MissingArtifact,
    mds_root,
    read_crops,
    read_latents,
    report_dir,
    stats_path,
)
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
        "quantization error bars, and a self-contained HTML report under <output>/report/."
    ),
)
def reconstruction_report(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
    from imagenet_int8_assets.core.vae import load_vae_as_recorded, resolve_device
    from imagenet_int8_assets.reader import open_dataset

    settings.require_recorded_settings_or_fail()
    classes = dataset_classes(context.instance, settings)
    keys, vanished = classes.in_dataset, set(classes.vanished)
    root = mds_root(settings.output_path)
    build = mds_index.published_record(root)
    if build is None:
        raise MissingArtifact(f"No published dataset at {root}: materialize 'mds_dataset' first.")
    value_range = float(build["quant_range"])
    device = resolve_device(settings.device)
    vae = load_vae_as_recorded(build["vae"]).to(device)
    dataset = open_dataset(root)
    published = build["per_class"]  # the published index lists its classes in this order
    if int(dataset.num_samples) != sum(published.values()):
        raise Failure(
            description=(
                f"The dataset at {root} was republished while the report opened it ({dataset.num_samples} samples in "
                f"its index, {sum(published.values())} in build.json): materialize reconstruction_report again."
            )
        )
    offsets = dict(zip(published, np.cumsum([0, *published.values()])[:-1].tolist()))

    samples, channel_values, skipped = [], [], {}
    # one line every 10 s and at the end, not one per class (at ImageNet size a log event per class
    # is about 10 s of a build's SQLite writes, after the last encode)
    progress = progress_logger(context.log.info, "classes decoded", total=len(keys))
    for done, key in enumerate(keys, 1):
        progress(done - 1)
        if key not in published:  # built since the dataset was published (automation may run the
            # report on a new stats materialization before mds_dataset publishes the class)
            skipped[key] = "not in the published dataset yet: materialize mds_dataset, then the report"
            context.log.warning(f"{key}: not in the report: {skipped[key]}")
            continue
        ids, arrays, _ = read_latents(settings.output_path, key)
        if len(ids) != published[key]:
            skipped[key] = (
                f"its latents ({len(ids)}) differ from its {published[key]} published samples (rebuilt since the "
                "dataset was published): materialize mds_dataset, then the report"
            )
            context.log.warning(f"{key}: not in the report: {skipped[key]}")
            continue
        if not ids:
            continue
        pick = choose_samples(len(ids), settings.report_per_class, settings.seed, key)
        _, crops = read_crops(settings.output_path, key, mmap=True)
        try:  # crops kept as 'none' (or 'png') are recomputed (decoded) and verified here
            originals = np.asarray(crops[pick])
        except CropVerificationError as exc:
            if key in vanished and exc.source_missing:
                # a class whose folder vanished stays in the dataset, but crops kept as 'none'
                # cannot be recomputed without its files: report on the other classes
                skipped[key] = "its class folder vanished from the source and its crops were not stored"
                context.log.warning(f"{key}: not in the report: {skipped[key]}")
                continue
            raise Failure(description=str(exc), allow_retries=False) from None
        z_float = arrays["latent"][pick]
        z_uint8 = np.stack([dataset[offsets[key] + int(i)]["latent"] for i in pick])
        from_float = decode_images(vae, z_float, device)
        from_uint8 = decode_images(vae, z_uint8, device)
        rows = [
            {"class": key, "id": ids[int(i)], **metrics}
            for i, metrics in zip(pick, reconstruction_rows(originals, from_float, from_uint8))
        ]
        samples.append(ClassSamples(key, originals, from_float, from_uint8, rows))
        channel_values.append(np.moveaxis(z_float, 1, 0).reshape(z_float.shape[1], -1))
    progress(len(keys))
    del dataset
    if not any(s.rows for s in samples):
        raise MissingArtifact("The dataset has no images to report on.")

    stats = json.loads(stats_path(settings.output_path).read_text(encoding="utf-8"))
    lpips_ok, lpips_note = lpips_available()
    report = assemble_report(
        samples, channel_values, stats, value_range, build["vae"]["requested"], lpips_note,
        per_class=settings.report_per_class, max_grid_images=settings.report_grid_images,
    )
    overall, images = report.overall, report.images
    space = SpaceNeeds("reconstruction_report", settings.output_path)
    space.writing(1, report.size())
    with space.guard():
        report.write(report_dir(settings.output_path))
    folder = report_dir(settings.output_path)
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

