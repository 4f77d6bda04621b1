"""reconstruction_report: what the latents lost, against the crops and through the uint8 codes."""

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
from imagenet_int8_assets.assets.metadata import QUALITY_GROUP, progress_logger
from imagenet_int8_assets.core.common.layout import report_dir
from imagenet_int8_assets.core.common.plotting import markdown_image
from imagenet_int8_assets.core.crops.crop_store import CropVerificationError
from imagenet_int8_assets.core.quality.reconstruction_report import quality_problems, read_summary
from imagenet_int8_assets.core.quality.report_step import DatasetRepublished, ReportConfig, report_reconstructions
from imagenet_int8_assets.resources import ImagenetInt8Settings


@asset(
    name="reconstruction_report",
    group_name=QUALITY_GROUP,
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
    from imagenet_int8_assets.core.latents.devices import resolve_device

    settings.require_recorded_settings_or_fail()
    classes = dataset_classes(context.instance, settings)
    keys = classes.in_dataset
    config = ReportConfig(
        settings.output_path, settings.report_per_class, settings.report_grid_images, settings.seed,
        resolve_device(settings.device),
    )

    def report_space(nbytes: int) -> SpaceNeeds:
        space = SpaceNeeds("reconstruction_report", settings.output_path)
        space.writing(1, nbytes)
        return space

    try:
        done = report_reconstructions(
            config, keys, classes.vanished, space=report_space, info=context.log.info, warning=context.log.warning,
            # one line every 10 s and at the end, not one per class (at ImageNet size a log event per
            # class is about 10 s of a build's SQLite writes, after the last encode)
            progress=progress_logger(context.log.info, "classes reported", total=len(keys)),
        )
    except DatasetRepublished as exc:
        raise Failure(description=str(exc)) from None
    except CropVerificationError as exc:
        raise Failure(description=str(exc), allow_retries=False) from None
    report, skipped = done.report, done.skipped
    overall, images = report.overall, report.images
    return MaterializeResult(
        metadata={
            "report": MetadataValue.path(str(done.folder / "report.html")),
            "images": overall["images"],
            "psnr_float": overall["psnr_float"],
            "psnr_uint8": overall["psnr_uint8"],
            "psnr_gap_db": overall["psnr_gap"],
            "ssim_float": overall["ssim_float"],
            "ssim_uint8": overall["ssim_uint8"],
            "lpips": done.lpips_note if not done.lpips_ok else "computed",
            "classes_decoded": len(done.decoded),
            "classes_reused": len(done.reused),
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

