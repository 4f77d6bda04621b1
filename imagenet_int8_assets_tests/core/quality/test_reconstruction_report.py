"""The reconstruction report's assembly and files (core.quality.reconstruction_report), without Dagster."""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from imagenet_int8_assets.core.latents.quantize import ChannelStats
from imagenet_int8_assets.core.quality.reconstruct import reconstruction_rows
from imagenet_int8_assets.core.quality.reconstruction_report import (
    CACHE_FOLDER,
    SUMMARY,
    ClassSamples,
    GridPlan,
    ReportCache,
    aggregate,
    assemble_report,
    class_cache_key,
    grid_tiles,
    metrics_csv,
    per_class_rows,
    quality_problems,
    read_summary,
)
from imagenet_int8_assets.core.crops.crop_store import write_crops
from imagenet_int8_assets.core.latents.latent_store import write_latents


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
    channel_values = rng.normal(0, 5, (4, n * 16)).astype(np.float32)
    return ClassSamples(name, originals, noisy, noisier, rows, channel_values)


def test_grid_tiles_go_round_robin_over_classes_and_stop_at_the_limit():
    samples = [_samples("a", 3), _samples("b", 1, seed=1), _samples("c", 2, seed=2)]
    tiles = grid_tiles(samples, per_class=3, max_images=5)
    assert [t[5] for t in tiles] == ["a", "b", "c", "a", "c"]
    np.testing.assert_array_equal(tiles[3][0], samples[0].originals[1])
    assert tiles[1][3] == samples[1].rows[0]["psnr_float"]
    assert len(grid_tiles(samples, per_class=3, max_images=100)) == 6


def _same_tiles(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert all(np.array_equal(a, b) for a, b in zip(g[:3], w[:3])) and g[3:] == w[3:]


def test_grid_plan_keeps_every_image_the_grid_shows_and_a_bounded_number_in_all():
    rng = np.random.default_rng(0)
    for trial in range(300):
        per_class, max_images = int(rng.integers(1, 6)), int(rng.integers(1, 13))
        counts = [int(c) for c in rng.integers(1, per_class + 1, size=int(rng.integers(1, 25)))]
        full = [
            ClassSamples(f"c{j}", *rng.integers(0, 256, (3, n, 2, 2, 3), dtype=np.uint8),
                         [_row(f"c{j}", float(rng.uniform(20, 40)), 20.0) for _ in range(n)])
            for j, n in enumerate(counts)
        ]
        plan = GridPlan(per_class, max_images)
        kept = [s.keep_first(plan.add(len(s.rows))) for s in full]
        # the grid made from the few kept images is the grid made from every image
        _same_tiles(grid_tiles(kept, per_class, max_images), grid_tiles(full, per_class, max_images))
        shown = [len(s.originals) for s in kept]
        assert all(n <= max_images for n in shown) and not any(shown[max_images:])
        assert all(s.rows == f.rows for s, f in zip(kept, full))
    # full classes keep about max_images * ln(max_images) images, however many classes come: class j keeps
    # image n while j * (n + 1) + n < 8
    plan = GridPlan(4, 8)
    assert [plan.add(4) for _ in range(1000)][:9] == [4, 4, 2, 2, 1, 1, 1, 1, 0]
    assert sum(plan.add(4) for _ in range(1000)) == 0


def test_grid_tiles_refuse_to_show_an_image_that_was_not_kept():
    samples = [_samples("a", 2).keep_first(1), _samples("b", 2, seed=1)]
    assert len(grid_tiles(samples, per_class=2, max_images=2)) == 2
    with pytest.raises(ValueError, match="image 1 of class 'a'"):
        grid_tiles(samples, per_class=2, max_images=3)


def _key(name="a", **changes):
    return {"format": 1, "class": name, "version": "classes/a/v-1", "latents": [1, 2, 3, 4], "seed": 0, **changes}


def _same_samples(got, want):
    assert got.name == want.name and got.rows == want.rows
    for field_name in ("originals", "from_float", "from_uint8", "channel_values"):
        a, b = getattr(got, field_name), getattr(want, field_name)
        assert a.dtype == b.dtype and np.array_equal(a, b), field_name


def test_report_cache_round_trips_an_entry_and_ignores_damaged_or_foreign_ones(tmp_path):
    cache = ReportCache(tmp_path / "report")
    a = _samples("a", 3).keep_first(2)
    a.rows[0]["psnr_float"] = float("inf")  # identical images: inf survives the round trip
    cache.save(_key(), a)
    assert [p.name for p in (tmp_path / "report" / CACHE_FOLDER).iterdir()] == ["a.npz"]  # no temporary left
    _same_samples(cache.load(_key(), count=3, shown=2), a)
    assert cache.load(_key(), count=3, shown=1) is not None  # more images than needed is fine
    assert cache.load(_key(), count=3, shown=3) is None  # the grid needs an image it does not hold
    assert cache.load(_key(), count=4, shown=0) is None  # another sample size
    assert cache.load(_key(version="classes/a/v-2"), count=3, shown=0) is None  # a changed input
    assert cache.load(_key("b"), count=3, shown=0) is None  # no entry
    # a foreign entry (another class's file under this class's name) is not trusted
    cache.path("b").write_bytes(cache.path("a").read_bytes())
    assert cache.load(_key("b"), count=3, shown=0) is None
    # the right key with contents that do not fit it is not trusted either
    with pytest.raises(ValueError, match="not those of 'a'"):
        cache.save(_key("b"), a)  # results of 'a' are not saved as 'b'
    tampered = io.BytesIO()
    np.savez(tampered, key=np.array(json.dumps(_key("b"), sort_keys=True)), rows=np.array(json.dumps(a.rows)),
             channel_values=a.channel_values, originals=a.originals, from_float=a.from_float, from_uint8=a.from_uint8)
    cache.path("b").write_bytes(tampered.getvalue())
    assert cache.load(_key("b"), count=3, shown=0) is None  # its rows name class 'a'
    # damaged files: truncated, garbage, empty, a folder in its place
    data = cache.path("a").read_bytes()
    for damaged in (data[: len(data) // 2], b"not an npz", b""):
        cache.path("a").write_bytes(damaged)
        assert cache.load(_key(), count=3, shown=0) is None
    cache.path("a").unlink()
    cache.path("a").mkdir()
    assert cache.load(_key(), count=3, shown=0) is None


def test_writing_the_report_keeps_the_cache_entries_of_its_classes_only(tmp_path):
    folder = tmp_path / "report"
    cache = ReportCache(folder)
    samples = {name: _samples(name, 2, seed=i) for i, name in enumerate(["a", "b<&>", "gone"])}
    for name, s in samples.items():
        cache.save(_key(name), s)
    (cache.folder / ".tmp-a.npz-1234abcd").write_bytes(b"left by a killed run")
    report = assemble_report(
        list(samples.values())[:2], [s.channel_values for s in list(samples.values())[:2]], _stats(), 12.0, "x", "",
        per_class=2, max_grid_images=3,
    )
    report.write(folder, cached=["a", "b<&>", "never-cached"])
    assert sorted(p.name for p in cache.folder.iterdir()) == sorted(cache.path(n).name for n in ("a", "b<&>"))
    _same_samples(cache.load(_key("b<&>"), count=2, shown=2), samples["b<&>"])
    assert (folder / SUMMARY).is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    report.write(folder)  # nothing cached: the whole cache goes
    assert not cache.folder.exists() and (folder / SUMMARY).is_file()


def test_class_cache_key_changes_with_every_input_that_decides_the_results(tmp_path):
    from PIL import Image

    out, source = tmp_path / "out", tmp_path / "src"
    (source / "a").mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    ids = [f"a/{i}.png" for i in range(3)]
    for name, image in zip(ids, images):
        Image.fromarray(image).save(source / name)
    latents = {"latent": np.zeros((3, 4, 2, 2), np.float32)}

    def build():
        write_crops(out, "a", ids, images, {"recipe": "imagenet.int8", "size": 16, "failed": []}, "none", source)
        write_latents(out, "a", ids, latents, {"seed": 0})

    inputs = {"version": "classes/a/v-1", "vae": {"requested": "tiny-random", "weights_sha256": None},
              "value_range": 12.0, "seed": 0, "per_class": 2, "device_type": "cpu", "torch_version": "2.0"}

    def key(pick=(0, 2), **changes):
        return class_cache_key(out, "a", list(pick), **{**inputs, **changes})

    build()
    first = key()
    assert key() == first and json.loads(json.dumps(first)) == first  # stable, and JSON as it is stored
    assert first["latents"] is not None and first["crops"]["files"][0] is not None
    for change in ({"version": "classes/a/v-2"}, {"vae": {"requested": "tiny-random", "weights_sha256": "ab"}},
                   {"value_range": 10.0}, {"seed": 1}, {"per_class": 3}, {"device_type": "cuda"}, {"torch_version": "2.1"}):
        assert key(**change) != first, change
    assert key(pick=(0, 1)) != first  # another sample
    # a picked source file touched (crops kept as 'none' are recomputed from it); an unpicked one is not read
    os.utime(source / ids[1], ns=(1, 1))
    assert key() == first
    os.utime(source / ids[2], ns=(1, 1))
    touched = key()
    assert touched != first
    build()  # latents and crops written again, same content: new files, so decoded again
    rebuilt = key()
    assert rebuilt["latents"] != touched["latents"] and rebuilt["crops"]["record"] != touched["crops"]["record"]
    (source / ids[0]).unlink()  # a vanished source file
    assert key()["crops"]["files"][0] is None


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
    # each names the setting that holds its limit, and clipping where a better range is recommended
    assert "IMAGENET_INT8_REPORT_MAX_PSNR_GAP" in problems[0]
    assert "IMAGENET_INT8_REPORT_MAX_CLIP_FRACTION" in problems[1] and "recommended_range" in problems[1]
