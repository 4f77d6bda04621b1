"""The reconstruction report's assembly and files (core.reconstruction_report), without Dagster."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from imagenet_int8_assets.core.quantize import ChannelStats
from imagenet_int8_assets.core.reconstruct import reconstruction_rows
from imagenet_int8_assets.core.reconstruction_report import (
    SUMMARY,
    ClassSamples,
    aggregate,
    assemble_report,
    grid_tiles,
    metrics_csv,
    per_class_rows,
    quality_problems,
    read_summary,
)


def _row(cls, psnr_float, psnr_uint8, ssim=0.9):
    return {"class": cls, "id": f"{cls}/x", "psnr_float": psnr_float, "psnr_uint8": psnr_uint8,
            "psnr_gap": psnr_float - psnr_uint8, "ssim_float": ssim, "ssim_uint8": ssim - 0.1}


def test_aggregate_and_per_class_means():
    rows = [_row("a", 30.0, 28.0), _row("a", 32.0, 29.0), _row("b", 20.0, 20.0)]
    overall = aggregate(rows)
    assert overall["images"] == 3
    assert overall["psnr_float"] == pytest.approx(82 / 3) and overall["psnr_gap"] == pytest.approx(5 / 3)
    classes = per_class_rows(rows)
    assert [c["class"] for c in classes] == ["a", "b"]
    assert classes[0]["images"] == 2 and classes[0]["psnr_uint8"] == pytest.approx(28.5)
    assert classes[1]["psnr_gap"] == 0.0
    empty = aggregate([])
    assert empty["images"] == 0 and math.isnan(empty["psnr_float"])


def test_metrics_csv_round_trips_and_is_empty_without_rows():
    rows = [_row("a", 30.0, 28.0), _row("é,b", 20.5, 20.0)]
    back = list(csv.DictReader(io.StringIO(metrics_csv(rows).decode("utf-8"))))
    assert [r["class"] for r in back] == ["a", "é,b"]
    assert list(back[0]) == list(rows[0]) and float(back[1]["psnr_float"]) == 20.5
    assert metrics_csv([]) == b""


def _samples(name, n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    originals = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    noisy = np.clip(originals.astype(int) + rng.integers(-3, 4, originals.shape), 0, 255).astype(np.uint8)
    noisier = np.clip(originals.astype(int) + rng.integers(-9, 10, originals.shape), 0, 255).astype(np.uint8)
    rows = [{"class": name, "id": f"{name}/{i}", **m} for i, m in enumerate(reconstruction_rows(originals, noisy, noisier))]
    return ClassSamples(name, originals, noisy, noisier, rows)


def test_grid_tiles_go_round_robin_over_classes_and_stop_at_the_limit():
    samples = [_samples("a", 3), _samples("b", 1, seed=1), _samples("c", 2, seed=2)]
    tiles = grid_tiles(samples, per_class=3, max_images=5)
    assert [t[5] for t in tiles] == ["a", "b", "c", "a", "c"]
    np.testing.assert_array_equal(tiles[3][0], samples[0].originals[1])
    assert tiles[1][3] == samples[1].rows[0]["psnr_float"]
    assert len(grid_tiles(samples, per_class=3, max_images=100)) == 6


def _stats(value_range=12.0):
    stats = ChannelStats(4, value_range)
    stats.update(np.random.default_rng(0).normal(0, 5, (8, 4, 4, 4)).astype(np.float32))
    totals = stats.totals()
    return {"overall": stats.summary(), "clip_fraction": totals["clip_fraction"], "quant_rmse": totals["quant_rmse"]}


def test_assemble_and_write_the_report_folder(tmp_path):
    samples = [_samples("a", 2), _samples("b<&>", 2, seed=1)]
    latents = np.random.default_rng(3).normal(size=(4, 4, 4, 4)).astype(np.float32)
    channel_values = [np.moveaxis(latents, 1, 0).reshape(4, -1)]
    note = "LPIPS not computed: weights <missing> & offline"
    report = assemble_report(samples, channel_values, _stats(), 12.0, "tiny-random", note, per_class=2, max_grid_images=3)
    folder = report.write(tmp_path / "report")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["grid.png", "histograms.png", "quant_rmse.png", "clip_fraction.png", "report.html", "report.md", "metrics.csv", SUMMARY]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with Image.open(folder / "grid.png") as grid:
        assert grid.format == "PNG" and grid.height > 3 * 16  # three tiles high
    summary = read_summary(folder)
    assert summary["images"] == 4 and summary["vae"] == "tiny-random" and summary["quant_range"] == 12.0
    assert [c["class"] for c in summary["per_class"]] == ["a", "b<&>"]
    assert summary["psnr_float"] == pytest.approx(report.overall["psnr_float"])
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "weights &lt;missing&gt; &amp; offline" in page and "range +-12." in page
    assert page.count("data:image/png;base64,") == 4
    markdown = (folder / "report.md").read_text(encoding="utf-8")
    assert "![grid](grid.png)" in markdown and "| b<&> |" in markdown
    rows = list(csv.DictReader(io.StringIO((folder / "metrics.csv").read_text(encoding="utf-8"))))
    assert len(rows) == 4 and rows[2]["class"] == "b<&>"
    assert report.size() == sum(p.stat().st_size for p in folder.iterdir())
    # rewriting replaces the folder as a whole
    (folder / "stale.txt").write_text("old")
    report.write(folder)
    assert not (folder / "stale.txt").exists()
    assert json.loads((folder / SUMMARY).read_text())["images"] == 4


def test_assembling_without_images_is_an_error():
    with pytest.raises(ValueError, match="no decoded images"):
        assemble_report([], [], _stats(), 12.0, "x", "", per_class=2, max_grid_images=4)


def test_quality_problems_name_each_threshold_exceeded():
    summary = {"psnr_gap": 0.8, "clip_fraction": 0.02, "quant_range": 12.0}
    assert quality_problems(summary, max_psnr_gap=1.0, max_clip_fraction=0.05) == []
    problems = quality_problems(summary, max_psnr_gap=0.5, max_clip_fraction=0.01)
    assert len(problems) == 2
    assert "0.80 dB" in problems[0] and "limit 0.5" in problems[0]
    assert "2.00%" in problems[1] and "+-12" in problems[1] and "recommended range" in problems[1]
