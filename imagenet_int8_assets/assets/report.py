"""reconstruction_report: what the latents lost, against the crops and through the uint8 codes."""

import csv
import io
import json

import numpy as np
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from imagenet_int8_assets.assets.disk_space import SpaceNeeds
from imagenet_int8_assets.assets.manifest import dataset_classes
from imagenet_int8_assets.assets.metadata import markdown_table
from imagenet_int8_assets.core import mds_index
from imagenet_int8_assets.core.metrics import lpips_available, summarize
from imagenet_int8_assets.core.plotting import markdown_image
from imagenet_int8_assets.core.reconstruct import (
    choose_samples,
    decode_images,
    reconstruction_rows,
)
from imagenet_int8_assets.core.storage import (
    MissingArtifact,
    atomic_dir,
    mds_root,
    read_crops,
    read_latents,
    report_dir,
    stats_path,
)
from imagenet_int8_assets.resources import ImagenetInt8Settings

GROUP = "quality"
SUMMARY = "summary.json"


def _aggregate(rows: list[dict]) -> dict:
    out = {"images": len(rows)}
    for key in ("psnr_float", "psnr_uint8", "psnr_gap", "ssim_float", "ssim_uint8"):
        out[key] = summarize([r[key] for r in rows])["mean"] if rows else float("nan")
    return out


def _csv(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


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
    from imagenet_int8_assets.core import report_figures as figures
    from imagenet_int8_assets.core.vae import load_vae_as_recorded, resolve_device
    from imagenet_int8_assets.reader import open_dataset

    settings.require_recorded_settings_or_fail()
    keys = dataset_classes(context.instance, settings).in_dataset
    root = mds_root(settings.output_path)
    build = mds_index.published_record(root)
    if build is None:
        raise MissingArtifact(f"No published dataset at {root}: materialize 'mds_dataset' first.")
    value_range = float(build["quant_range"])
    device = resolve_device(settings.device)
    vae = load_vae_as_recorded(build["vae"]).to(device)
    dataset = open_dataset(root)
    offsets, start = {}, 0
    for key in keys:  # the published index lists the classes in partition order
        offsets[key] = start
        start += build["per_class"].get(key, 0)

    rows, grid, channel_values = [], [], []
    for key in keys:
        ids, arrays, _ = read_latents(settings.output_path, key)
        if not ids:
            continue
        pick = choose_samples(len(ids), settings.report_per_class, settings.seed, key)
        _, crops = read_crops(settings.output_path, key, mmap=True)
        originals = np.asarray(crops[pick])
        z_float = arrays["latent"][pick]
        z_uint8 = np.stack([dataset[offsets[key] + int(i)]["latent"] for i in pick])
        from_float = decode_images(vae, z_float, device)
        from_uint8 = decode_images(vae, z_uint8, device)
        for i, metrics in zip(pick, reconstruction_rows(originals, from_float, from_uint8)):
            rows.append({"class": key, "id": ids[int(i)], **metrics})
        grid.append((key, originals, from_float, from_uint8, rows[-len(pick):]))
        channel_values.append(np.moveaxis(z_float, 1, 0).reshape(z_float.shape[1], -1))
        context.log.info(f"{key}: decoded {len(pick)} images")
    del dataset
    if not rows:
        raise MissingArtifact("The dataset has no images to report on.")

    overall = _aggregate(rows)
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row)
    per_class = [{"class": k, **_aggregate(class_rows)} for k, class_rows in by_class.items()]
    stats = json.loads(stats_path(settings.output_path).read_text(encoding="utf-8"))
    lpips_ok, lpips_note = lpips_available()

    # Grid: round-robin over classes so every class shows up before any repeats.
    tiles = []
    for n in range(settings.report_per_class):
        for key, o, f, u, class_rows in grid:
            if n < len(o) and len(tiles) < settings.report_grid_images:
                tiles.append((o[n], f[n], u[n], class_rows[n]["psnr_float"], class_rows[n]["psnr_uint8"], key))
    grid_image = figures.reconstruction_grid(
        np.stack([t[0] for t in tiles]), np.stack([t[1] for t in tiles]), np.stack([t[2] for t in tiles]),
        [t[3] for t in tiles], [t[4] for t in tiles], labels=[t[5] for t in tiles],
    )
    grid_png = io.BytesIO()
    grid_image.save(grid_png, format="PNG")
    images = {
        "grid": grid_png.getvalue(),
        "histograms": figures.channel_histograms(list(np.concatenate(channel_values, axis=1)), value_range),
        "quant_rmse": figures.channel_bars(stats["overall"], "quant_rmse", "quantization RMSE per channel"),
        "clip_fraction": figures.channel_bars(stats["overall"], "clip_fraction", f"fraction clipped at +-{value_range:g}"),
    }
    summary = {
        **overall,
        "clip_fraction": stats["clip_fraction"],
        "quant_rmse": stats["quant_rmse"],
        "quant_range": value_range,
        "lpips": lpips_note,
        "vae": build["vae"]["requested"],
        "per_class": per_class,
    }
    channel_columns = ["channel", "mean", "std", "p0.1", "p99.9", "clip_fraction", "quant_rmse"]
    overall_table = markdown_table([overall])
    class_table = markdown_table(per_class)
    channel_table = markdown_table(stats["overall"], channel_columns)
    html = figures.html_report(
        "Reconstruction quality",
        [
            ("Overall (mean over images)", figures.html_table([overall], list(overall))),
            ("Per class", figures.html_table(per_class, list(per_class[0]))),
            ("Latent channels", figures.html_table(stats["overall"], channel_columns)),
            ("Notes", f"<p>{lpips_note}</p><p>VAE: {build['vae']['requested']}; range +-{value_range:g}.</p>"),
        ],
        images,
    )
    markdown = "\n\n".join(
        ["# Reconstruction quality", "## Overall", overall_table, "## Per class", class_table, "## Latent channels",
         channel_table, lpips_note]
        + [f"![{name}]({name}.png)" for name in images]
    )
    space = SpaceNeeds("reconstruction_report", settings.output_path)
    space.writing(1, sum(map(len, images.values())) + len(html) + len(markdown))
    with space.guard(), atomic_dir(report_dir(settings.output_path)) as tmp:
        for name, png in images.items():
            (tmp / f"{name}.png").write_bytes(png)
        (tmp / "report.html").write_text(html, encoding="utf-8")
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        (tmp / "metrics.csv").write_bytes(_csv(rows))
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
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
            "overall": MetadataValue.md(overall_table),
            "per_class": MetadataValue.md(class_table),
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
    summary = json.loads((report_dir(settings.output_path) / SUMMARY).read_text(encoding="utf-8"))
    problems = []
    if summary["psnr_gap"] > settings.report_max_psnr_gap:
        problems.append(f"uint8 latents lose {summary['psnr_gap']:.2f} dB PSNR against float (limit {settings.report_max_psnr_gap:g})")
    if summary["clip_fraction"] > settings.report_max_clip_fraction:
        problems.append(
            f"{summary['clip_fraction']:.2%} of latent values are clipped at +-{summary['quant_range']:g} "
            f"(limit {settings.report_max_clip_fraction:.2%}); see quantization_stats' recommended range"
        )
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

