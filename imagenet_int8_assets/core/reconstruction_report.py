"""The reconstruction report's content and files (no Dagster import).

``reconstruction_report`` (the asset) decodes a seeded sample per class and hands the results
here: ``assemble_report`` aggregates the per-image metrics (overall and per class), lays out the
grid (round-robin over classes), draws the figures and builds report.html, report.md,
metrics.csv and summary.json; ``ReconstructionReport.write`` replaces the report folder
atomically. ``quality_problems`` is the blocking check's rule, read from summary.json.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagenet_int8_assets.core.metrics import summarize
from imagenet_int8_assets.core.storage import write_folder
from imagenet_int8_assets.core.tables import markdown_table

SUMMARY = "summary.json"
METRICS = ("psnr_float", "psnr_uint8", "psnr_gap", "ssim_float", "ssim_uint8")
CHANNEL_COLUMNS = ["channel", "mean", "std", "p0.1", "p99.9", "clip_fraction", "quant_rmse"]


@dataclass
class ClassSamples:
    """One class's decoded sample: the crops, both reconstructions and one metrics row per image."""

    name: str
    originals: np.ndarray  # uint8 (n, S, S, 3)
    from_float: np.ndarray
    from_uint8: np.ndarray
    rows: list[dict]


def aggregate(rows: Sequence[dict]) -> dict:
    """``{"images": n, <metric>: mean over rows}`` for every metric (NaN without rows)."""
    out: dict = {"images": len(rows)}
    for key in METRICS:
        out[key] = summarize([r[key] for r in rows])["mean"] if rows else float("nan")
    return out


def per_class_rows(rows: Sequence[dict]) -> list[dict]:
    """``aggregate`` per class, classes in order of first appearance."""
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row)
    return [{"class": k, **aggregate(class_rows)} for k, class_rows in by_class.items()]


def metrics_csv(rows: Sequence[dict]) -> bytes:
    """The per-image metrics as CSV (UTF-8), columns in the first row's order; empty without rows."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def grid_tiles(samples: Sequence[ClassSamples], per_class: int, max_images: int) -> list[tuple]:
    """Round-robin over classes (every class shows before any repeats), at most ``max_images``:
    ``(original, from_float, from_uint8, psnr_float, psnr_uint8, class)`` per tile."""
    tiles = []
    for n in range(per_class):
        for s in samples:
            if n < len(s.originals) and len(tiles) < max_images:
                tiles.append(
                    (s.originals[n], s.from_float[n], s.from_uint8[n], s.rows[n]["psnr_float"], s.rows[n]["psnr_uint8"], s.name)
                )
    return tiles


@dataclass
class ReconstructionReport:
    rows: list[dict]
    overall: dict
    per_class: list[dict]
    summary: dict
    images: dict[str, bytes]  # name -> PNG
    html: str
    markdown: str
    tables: dict[str, str] = field(default_factory=dict)  # "overall", "per_class", "channels" (markdown)

    def files(self) -> dict[str, bytes]:
        """Every file of the report folder, by name."""
        out = {f"{name}.png": png for name, png in self.images.items()}
        out["report.html"] = self.html.encode("utf-8")
        out["report.md"] = self.markdown.encode("utf-8")
        out["metrics.csv"] = metrics_csv(self.rows)
        out[SUMMARY] = json.dumps(self.summary, indent=2, default=float).encode("utf-8")
        return out

    def size(self) -> int:
        return sum(len(data) for data in self.files().values())

    def write(self, folder: str | os.PathLike) -> Path:
        """Replace ``folder`` with the report as a whole (``storage.write_folder``)."""
        return write_folder(folder, self.files())


def assemble_report(
    samples: Sequence[ClassSamples],
    channel_values: Sequence[np.ndarray],
    stats: dict,
    value_range: float,
    vae_name: str,
    lpips_note: str,
    per_class: int,
    max_grid_images: int,
) -> ReconstructionReport:
    """The whole report from the decoded samples and quantization_stats' record (``stats``).

    ``channel_values``: per class, the float latents as (channels, values). Raises ValueError
    when no class has an image.
    """
    from imagenet_int8_assets.core import report_figures as figures

    rows = [row for s in samples for row in s.rows]
    if not rows:
        raise ValueError("no decoded images to report on")
    overall = aggregate(rows)
    classes = per_class_rows(rows)
    tiles = grid_tiles(samples, per_class, max_grid_images)
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
        "vae": vae_name,
        "per_class": classes,
    }
    tables = {
        "overall": markdown_table([overall]),
        "per_class": markdown_table(classes),
        "channels": markdown_table(stats["overall"], CHANNEL_COLUMNS),
    }
    notes = [lpips_note, f"VAE: {vae_name}; range +-{value_range:g}."]
    page = figures.html_report(
        "Reconstruction quality",
        [
            ("Overall (mean over images)", figures.html_table([overall], list(overall))),
            ("Per class", figures.html_table(classes, list(classes[0]))),
            ("Latent channels", figures.html_table(stats["overall"], CHANNEL_COLUMNS)),
            ("Notes", "".join(f"<p>{html.escape(note)}</p>" for note in notes)),
        ],
        images,
    )
    markdown = "\n\n".join(
        ["# Reconstruction quality", "## Overall", tables["overall"], "## Per class", tables["per_class"],
         "## Latent channels", tables["channels"], lpips_note]
        + [f"![{name}]({name}.png)" for name in images]
    )
    return ReconstructionReport(rows, overall, classes, summary, images, page, markdown, tables)


def read_summary(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / SUMMARY).read_text(encoding="utf-8"))


def quality_problems(summary: dict, max_psnr_gap: float, max_clip_fraction: float) -> list[str]:
    """What exceeds the thresholds (empty: within them), one sentence each."""
    problems = []
    if summary["psnr_gap"] > max_psnr_gap:
        problems.append(f"uint8 latents lose {summary['psnr_gap']:.2f} dB PSNR against float (limit {max_psnr_gap:g})")
    if summary["clip_fraction"] > max_clip_fraction:
        problems.append(
            f"{summary['clip_fraction']:.2%} of latent values are clipped at +-{summary['quant_range']:g} "
            f"(limit {max_clip_fraction:.2%}); see quantization_stats' recommended range"
        )
    return problems
