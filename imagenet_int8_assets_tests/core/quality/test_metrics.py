"""Image-quality metrics and report figures (pure core; CPU, no network)."""

from __future__ import annotations

import base64
import importlib.util
import io
import math
import re

import numpy as np
import pytest
from PIL import Image

from imagenet_int8_assets.core.quality import metrics
from imagenet_int8_assets.core.quality.metrics import batch_metrics, lpips_available, psnr, ssim, summarize
from imagenet_int8_assets.core.latents.quantize import ChannelStats
from imagenet_int8_assets.core.quality.report_figures import (
    GRID_HEADER,
    GRID_PAD,
    TEXT_BOX_MAX_HEIGHT,
    channel_bars,
    channel_histograms,
    grid_size,
    html_report,
    html_table,
    reconstruction_grid,
    tile_origin,
)


def grey(h=64, w=64, value=128):
    return np.full((h, w, 3), value, np.uint8)


def textured(h=64, w=80, seed=0):
    """A smooth, structured RGB picture (gradients and a few blobs), uint8, no saturation."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        img[..., c] = 128 + 40 * np.sin(x / (5 + 3 * c)) * np.cos(y / (7 + c))
        for _ in range(3):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            img[..., c] += rng.uniform(-30, 30) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 60.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def reference_ssim(a, b, data_range=255.0):
    """Direct per-window SSIM (Wang et al. 2004): explicit 2-D Gaussian weights, no filtering
    tricks, centred variances; valid windows only, averaged, then averaged over channels."""
    r = np.arange(11) - 5
    yy, xx = np.meshgrid(r, r, indexing="ij")
    w = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scores = []
    for ch in range(a.shape[2]):
        vals = []
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                pa, pb = a[i : i + 11, j : j + 11, ch], b[i : i + 11, j : j + 11, ch]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
        scores.append(np.mean(vals))
    return float(np.mean(scores))


# --- PSNR / SSIM ---------------------------------------------------------------------------------


def test_identical_images():
    img = textured()
    assert psnr(img, img) == float("inf")
    assert ssim(img, img) == 1.0
    assert ssim(img.astype(np.float32), img.astype(np.float64)) == 1.0


def test_psnr_constant_offset_is_exact():
    a = grey(value=128)
    b = grey(value=133)  # error 5 everywhere -> MSE 25
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-12)
    assert psnr(b, a) == psnr(a, b)
    # another data range: 1.0-scaled images with the same relative error
    assert psnr(a / 255.0, b / 255.0, data_range=1.0) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-9)


def test_psnr_gaussian_noise():
    rng = np.random.default_rng(0)
    a = grey(256, 256, 128).astype(np.float64)
    noise = rng.normal(0.0, 10.0, a.shape)
    expected = 10 * math.log10(255**2 / 100)  # 28.1308 dB
    assert psnr(a, a + noise) == pytest.approx(expected, abs=0.1)
    # as uint8 (rounding adds 1/12 to the MSE; no clipping at 128 +- 6 sigma)
    noisy = np.rint(a + noise)
    assert noisy.min() > 0 and noisy.max() < 255
    assert psnr(a.astype(np.uint8), noisy.astype(np.uint8)) == pytest.approx(expected, abs=0.1)


def test_shape_mismatch_and_small_images_are_refused():
    with pytest.raises(ValueError):
        psnr(grey(10, 10), grey(10, 11))
    with pytest.raises(ValueError):
        ssim(grey(10, 40), grey(10, 40, 3))


def test_ssim_decreases_with_noise_and_shift_hurts_less_than_noise():
    img = textured(96, 96)
    rng = np.random.default_rng(1)
    base = rng.normal(0.0, 1.0, img.shape)
    scores = []
    for sigma in (1, 3, 6, 12, 25, 50):
        noisy = np.clip(img + sigma * base, 0, 255)
        scores.append(ssim(img, noisy))
    assert all(s1 > s2 for s1, s2 in zip(scores, scores[1:])), scores
    assert 0.0 < scores[-1] < 0.5 < scores[0] < 1.0
    shifted = ssim(img, np.clip(img.astype(np.int16) + 10, 0, 255))
    strong_noise = ssim(img, np.clip(img + 25 * base, 0, 255))
    assert shifted > 0.95
    assert shifted > strong_noise + 0.2


def test_ssim_matches_direct_per_window_reference():
    img = textured(17, 21, seed=3)
    rng = np.random.default_rng(2)
    noisy = np.clip(img + rng.normal(0, 12, img.shape), 0, 255)
    got = ssim(img, noisy)
    assert got == pytest.approx(reference_ssim(img, noisy), abs=1e-6)
    # and on a different data range
    assert ssim(img / 255.0, noisy / 255.0, data_range=1.0) == pytest.approx(got, abs=1e-9)
    # a greyscale (H x W) image is one channel
    assert ssim(img[..., 0], noisy[..., 0]) == pytest.approx(
        reference_ssim(img[..., :1], noisy[..., :1]), abs=1e-6
    )


def test_batch_metrics():
    rng = np.random.default_rng(6)
    originals = np.stack([textured(32, 32, seed=s) for s in range(3)])
    recon = originals.copy()
    recon[1] = np.clip(recon[1].astype(np.int16) + rng.integers(-8, 9, recon[1].shape), 0, 255)
    recon[2] = np.clip(recon[2].astype(np.int16) + 5, 0, 255)
    rows = batch_metrics(originals, recon)
    assert [set(r) for r in rows] == [{"psnr", "ssim"}] * 3
    assert rows[0] == {"psnr": float("inf"), "ssim": 1.0}
    for i in (1, 2):
        assert rows[i]["psnr"] == pytest.approx(psnr(originals[i], recon[i]))
        assert rows[i]["ssim"] == pytest.approx(ssim(originals[i], recon[i]))
        assert math.isfinite(rows[i]["psnr"]) and rows[i]["ssim"] < 1.0
    with pytest.raises(ValueError):
        batch_metrics(originals, recon[:2])


def test_summarize():
    s = summarize([30.0, 32.0, float("inf"), 34.0])
    assert s == {"mean": 32.0, "median": 33.0, "min": 30.0, "max": float("inf"), "count": 4, "inf_count": 1}
    assert summarize([1.0, 2.0, 3.0])["inf_count"] == 0
    all_inf = summarize([float("inf")] * 2)
    assert all_inf["mean"] == float("inf") and all_inf["count"] == 2 and all_inf["inf_count"] == 2
    empty = summarize([])
    assert empty["count"] == 0 and math.isnan(empty["mean"])
    with pytest.raises(ValueError):
        summarize([1.0, float("nan")])


def test_lpips_is_reported_unavailable_without_package_or_weights():
    ok, reason = lpips_available()
    assert isinstance(ok, bool) and isinstance(reason, str)
    if importlib.util.find_spec("lpips") is None:
        assert ok is False
        assert "LPIPS" in reason and "no downloads" in reason
        assert reason == metrics.LPIPS_UNAVAILABLE
    elif not ok:
        assert "LPIPS" in reason


# --- reconstruction grid -------------------------------------------------------------------------

COLOURS = ((200, 40, 40), (40, 180, 60), (50, 60, 210))


def solid(colour, size=(80, 80)):
    return np.broadcast_to(np.array(colour, np.uint8), (*size, 3)).copy()


def tile_array(grid: Image.Image, row: int, col: int, tile: int) -> np.ndarray:
    x0, y0 = tile_origin(row, col, tile)
    return np.asarray(grid)[y0 : y0 + tile, x0 : x0 + tile].astype(np.float64)


def test_grid_size_formula():
    assert grid_size(3, 64) == (3 * 64 + 4 * GRID_PAD, GRID_HEADER + 3 * 64 + 4 * GRID_PAD)
    assert grid_size(3, 64) == (208, 228)  # the documented constants: pad 4, header 20
    assert grid_size(1, 128) == (3 * 128 + 16, 20 + 128 + 8)


def test_grid_tiles_and_psnr_text():
    n, tile = 3, 64
    originals = [solid(COLOURS[0], (80 + 8 * i, 80)) for i in range(n)]
    from_float = [solid(COLOURS[1]) for _ in range(n)]
    from_uint8 = [solid(COLOURS[2], (70, 90)) for _ in range(n)]
    grid = reconstruction_grid(originals, from_float, from_uint8, [31.24, 29.0, float("inf")],
                               [30.0, 28.5, 27.0], tile=tile)
    assert isinstance(grid, Image.Image) and grid.mode == "RGB"
    assert grid.size == grid_size(n, tile) == (208, 228)

    plain_rows = tile - TEXT_BOX_MAX_HEIGHT  # rows never touched by the text box
    for col, colour in enumerate(COLOURS):
        t = tile_array(grid, 0, col, tile)
        np.testing.assert_allclose(t[:plain_rows].reshape(-1, 3).mean(axis=0), colour, atol=1.0)
        assert np.abs(t[:plain_rows] - np.array(colour)).max() <= 1.0

    # column 0 has no label: the whole tile is the plain colour
    assert np.abs(tile_array(grid, 0, 0, tile) - np.array(COLOURS[0])).max() <= 1.0
    # columns 1 and 2 carry text: the bottom-left corner has a dark box with white text in it
    for col in (1, 2):
        corner = tile_array(grid, 0, col, tile)[plain_rows:, : tile // 2]
        assert np.abs(corner - np.array(COLOURS[col])).max() > 100  # text drawn
        assert (corner.max(axis=-1) < 40).any()  # dark box
        assert (corner.min(axis=-1) > 200).any()  # white glyph pixels

    # without PSNRs nothing is drawn on the tiles, the size is unchanged
    bare = reconstruction_grid(originals, from_float, from_uint8, [None] * n, [None] * n, tile=tile)
    assert bare.size == grid.size
    for col, colour in enumerate(COLOURS):
        assert np.abs(tile_array(bare, 0, col, tile) - np.array(colour)).max() <= 1.0
    # identical text ("inf") is drawn too, and differs from "29.0 dB"
    assert not np.array_equal(tile_array(grid, 2, 1, tile), tile_array(grid, 1, 1, tile))
    # the header row has the column titles (dark text on white)
    header = np.asarray(grid)[:GRID_HEADER].astype(np.float64)
    assert (header.max(axis=-1) < 100).any() and (header.min(axis=-1) > 250).mean() > 0.5


def test_grid_labels_and_inputs():
    tile = 96
    originals = np.stack([solid(COLOURS[0], (64, 64))] * 2)
    grid = reconstruction_grid(originals, originals, originals, [40.0, 41.0], [35.0, 36.0],
                               labels=["acoustic guitar", "a very long class name that cannot fit"], tile=tile)
    assert grid.size == grid_size(2, tile)
    corner = tile_array(grid, 1, 0, tile)[tile - TEXT_BOX_MAX_HEIGHT :]
    assert np.abs(corner - np.array(COLOURS[0])).max() > 100  # label drawn on the original
    with pytest.raises(ValueError):
        reconstruction_grid(originals, originals, originals[:1], [1, 2], [1, 2], tile=tile)


# --- plots and HTML ------------------------------------------------------------------------------


def open_png(png: bytes) -> Image.Image:
    assert isinstance(png, bytes) and png[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(png))
    img.load()
    return img


def test_channel_histograms_png():
    rng = np.random.default_rng(7)
    sample = rng.normal(0, 4, (4, 5000))
    sample[2, :50] = 15.0  # 1% clipped in channel 2
    img = open_png(channel_histograms(sample, 12.0))
    assert img.format == "PNG" and 600 < img.width < 2000 and 150 < img.height < 1000
    # a list of 1-D arrays of different lengths, 5 channels -> two rows of panels
    img5 = open_png(channel_histograms([rng.normal(0, 3, 100 * (i + 1)) for i in range(5)], 8.0, bins=40))
    assert img5.height > img.height


def test_channel_bars_png():
    stats = ChannelStats(4)
    stats.update(np.random.default_rng(8).normal(0, 5, (10, 4, 8, 8)))
    rows = stats.summary()
    for key in ("quant_rmse", "clip_fraction"):
        img = open_png(channel_bars(rows, key, f"{key} per channel"))
        assert 250 < img.width < 2000 and 150 < img.height < 1000


def test_html_table_escapes_and_formats():
    table = html_table([{"name": "<b>", "value": 0.123456, "n": 3}], ["name", "value"])
    assert "&lt;b&gt;" in table and "0.1235" in table and "<th>value</th>" in table and ">3<" not in table


def test_html_report_is_self_contained():
    png = channel_bars([{"channel": 0, "x": 1.0}, {"channel": 1, "x": 2.0}], "x", "x")
    sections = [
        ("Summary", "PSNR from uint8 is **31.2 dB** on average.\n\n- one\n- two"),
        ("Per channel", html_table([{"channel": 0, "quant_rmse": 0.027}])),
        ("Markdown table", "| a | b |\n|---|---|\n| 1 | 2 |\n\n{{image:bars}}"),
    ]
    page = html_report("Quality <report>", sections, {"bars": png, "other": png})
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>Quality &lt;report&gt;</title>" in page
    for heading, _ in sections:
        assert f"<h2>{heading}</h2>" in page
    assert "<strong>31.2 dB</strong>" in page and "<li>one</li>" in page
    assert "<td>1</td><td>2</td>" in page
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 2  # "bars" inline, "other" in the trailing Figures section
    assert all(base64.b64decode(u) == png for u in uris)
    assert page.index("bars") < page.index("<h2>Figures</h2>") < page.rindex("other")
    assert "http://" not in page and "https://" not in page  # nothing fetched when opened
