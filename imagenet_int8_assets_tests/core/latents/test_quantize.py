"""uint8 codec and streaming statistics."""

from __future__ import annotations

import numpy as np
import pytest

from imagenet_int8_assets.core.dataset import mds, mds_index
from imagenet_int8_assets.core.dataset.dataset_check import DatasetDamaged, decode_params
from imagenet_int8_assets.core.latents.latent_store import read_latents, write_latents
from imagenet_int8_assets.core.latents.quantize import (
    DEFAULT_RANGE,
    HIST_BINS,
    HIST_LIMIT,
    ChannelStats,
    codes_range,
    dequantize,
    quantize,
    recorded_range,
    resolve_range,
    step,
)


def test_published_decoder_round_trips_every_byte():
    u = np.arange(256, dtype=np.uint8)
    z = dequantize(u)
    np.testing.assert_allclose(z, (u.astype(np.float32) / 255.0 - 0.5) * 24.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(quantize(z), u)
    assert z[0] == -12.0 and z[-1] == 12.0


def test_rounds_to_nearest_and_clips():
    rng = np.random.default_rng(0)
    z = rng.uniform(-12, 12, 100_000)
    err = dequantize(quantize(z)) - z
    assert np.abs(err).max() <= step() / 2 + 1e-6
    assert abs(err.mean()) < 1e-3  # no truncation bias (the published build's was -step/2)
    assert np.sqrt(np.mean(err**2)) == pytest.approx(step() / np.sqrt(12), rel=0.02)
    assert quantize(np.array([-100.0, 100.0, -12.0, 12.0])).tolist() == [0, 255, 0, 255]
    # just below a decision boundary rounds down, just above rounds up
    boundary = dequantize(np.array([100], np.uint8))[0] + step() / 2
    assert quantize(np.array([boundary - 1e-4, boundary + 1e-4])).tolist() == [100, 101]


def test_other_ranges():
    u = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(quantize(dequantize(u, 8.0), 8.0), u)
    assert step(8.0) == pytest.approx(16 / 255)


def test_channel_stats_match_numpy_and_merge():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 7.7, (30, 4, 8, 8)) + np.arange(4)[None, :, None, None]
    b = rng.normal(1, 3.0, (20, 4, 8, 8))
    whole = ChannelStats(4)
    whole.update(np.concatenate([a, b]))
    merged = ChannelStats(4)
    for part in (a, b):
        s = ChannelStats(4)
        s.update(part)
        merged.merge(s)
    data = np.concatenate([a, b])
    width = 2 * HIST_LIMIT / HIST_BINS
    for stats in (whole, merged):
        rows = stats.summary()
        for c, row in enumerate(rows):
            v = data[:, c].ravel()
            assert row["count"] == v.size
            assert row["mean"] == pytest.approx(v.mean(), abs=1e-9)
            assert row["std"] == pytest.approx(v.std(), rel=1e-9)
            assert row["min"] == v.min() and row["max"] == v.max()
            ordered = np.sort(v)
            for q in (0.1, 1, 50, 99, 99.9):
                # the histogram answer lies between the order statistics around rank q% (+- a bin)
                rank = q / 100 * v.size
                lo = ordered[max(0, int(np.floor(rank)) - 1)] - width
                hi = ordered[min(v.size - 1, int(np.ceil(rank)))] + width
                assert lo <= row[f"p{q:g}"] <= hi, (c, q)
            assert row["clip_fraction"] == pytest.approx(np.mean(np.abs(v) > 12))
            assert row["quant_rmse"] == pytest.approx(np.sqrt(np.mean((dequantize(quantize(v)) - v) ** 2)), rel=1e-5)
    for row_whole, row_merged in zip(whole.summary(), merged.summary()):
        assert row_merged == pytest.approx(row_whole, rel=1e-12)
    totals = whole.totals()
    assert totals["values"] == data.size and totals["mean"] == pytest.approx(data.mean(), abs=1e-9)
    assert totals["clip_fraction"] == pytest.approx(np.mean(np.abs(data) > 12))
    assert totals["quant_rmse"] == pytest.approx(np.sqrt(np.mean((dequantize(quantize(data)) - data) ** 2)), rel=1e-5)
    assert merged.totals() == pytest.approx(totals, rel=1e-12)


def test_stats_reject_wrong_layout():
    with pytest.raises(ValueError):
        ChannelStats(4).update(np.zeros((2, 16, 4, 4)))


def test_non_finite_values_are_counted_not_mixed_in():
    z = np.random.default_rng(2).normal(0, 1, (2, 4, 4, 4))
    clean = ChannelStats(4)
    clean.update(z)
    z[0, 1, 0, 0], z[1, 1, 2, 2], z[0, 3, 1, 1] = np.nan, np.inf, -np.inf
    dirty = ChannelStats(4)
    dirty.update(z)
    rows = dirty.summary()
    assert [r["non_finite"] for r in rows] == [0, 2, 0, 1]
    assert rows[1]["count"] == 2 * 16 - 2 and np.isfinite(rows[1]["mean"]) and np.isfinite(rows[3]["max"])
    assert rows[0] == pytest.approx(clean.summary()[0])


def test_the_range_is_the_setting_else_the_vaes_default():
    assert resolve_range(0.0, 4.33) == 4.33 and resolve_range(0, 12.0) == 12.0
    assert resolve_range(3.5, 4.33) == 3.5


def test_codes_are_made_at_the_setting_else_the_vaes_default_and_every_record_reads_back_that_range(tmp_path):
    """The range is decided where codes are made (``codes_range``: the setting, else the VAE's default
    the latents record), recorded in a class's and the dataset's build.json, and read back by one
    reader; a dataset without any range (the published Imagenet.int8) decodes at +-12."""
    vae = {"requested": "flux1-vae", "quant_range": 4.33}  # VaeInfo.as_dict(): the VAE's default range
    latent = np.random.default_rng(0).normal(size=(2, 4, 8, 8)).astype(np.float32)
    write_latents(tmp_path, "c", ["a", "b"], {"latent": latent}, {"vae": vae, "seed": 0})
    meta = read_latents(tmp_path, "c")[2]
    # the latents do not depend on the range: a new range re-makes the codes, never the latents
    assert "quant_range" not in meta
    assert codes_range(0.0, meta) == 4.33 and codes_range(6.0, meta) == 6.0
    with pytest.raises(ValueError, match="re-materialize vae_latents"):
        codes_range(0.0, {"seed": 0})
    # a class's build.json, and the dataset's record made from it, as mds writes them
    root = tmp_path / "mds"
    folder = mds.write_class_shards(root, "c", quantize(latent, 6.0), 1, "one", meta, value_range=codes_range(6.0, meta))
    info = mds_index.read_build_info(folder)
    assert recorded_range(info) == 6.0
    assert recorded_range(mds_index.dataset_record(info, {"samples": 2, "per_class": {}, "versions": {}})) == 6.0
    # no range recorded: the published +-12
    assert recorded_range({"latent_shape": [4, 32, 32]}) == DEFAULT_RANGE == 12.0
    for bad in (None, 0, -1.0, float("nan"), float("inf"), True, "12"):
        with pytest.raises(ValueError, match="invalid quant_range"):
            recorded_range({"quant_range": bad, "vae": vae})


def test_a_dataset_decodes_with_its_recorded_range_and_refuses_a_damaged_one(tmp_path):
    (tmp_path / "build.json").write_text('{"latent_shape": [4, 32, 32]}')
    assert decode_params(tmp_path, {"version": 2, "shards": []}).value_range == 12.0
    (tmp_path / "build.json").write_text('{"latent_shape": [16, 8, 8], "quant_range": 8}')
    params = decode_params(tmp_path, {"version": 2, "shards": []})
    assert params.value_range == 8.0 and params.latent_shape == (16, 8, 8)
    (tmp_path / "build.json").write_text('{"quant_range": -1}')
    with pytest.raises(DatasetDamaged, match=r"has an invalid quant_range -1; "):
        decode_params(tmp_path, {"version": 2, "shards": []})
    assert decode_params(tmp_path / "none", {"version": 2, "shards": []}).value_range == 12.0
