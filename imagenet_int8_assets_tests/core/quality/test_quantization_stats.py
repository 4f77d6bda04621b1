"""core.quality.quantization_stats: the statistics record of real stored latents against numpy."""

import numpy as np
import pytest

from imagenet_int8_assets.core.common.layout import MissingArtifact
from imagenet_int8_assets.core.latents.latent_store import write_latents
from imagenet_int8_assets.core.quality.quantization_stats import latent_statistics


def test_statistics_over_classes_match_numpy_at_the_setting_else_the_vaes_default_range(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(0, 5, size=(3, 4, 2, 2)).astype(np.float32)
    b = rng.normal(1, 5, size=(2, 4, 2, 2)).astype(np.float32)
    write_latents(tmp_path, "a", ["a1", "a2", "a3"], {"latent": a}, {"vae": {"quant_range": 6.0}, "seed": 0})
    write_latents(tmp_path, "b", ["b1", "b2"], {"latent": b}, {"vae": {"quant_range": 6.0}, "seed": 0})
    stats = latent_statistics(tmp_path, ["a", "b"])
    both = np.concatenate([a, b])
    record = stats.record
    assert stats.value_range == record["quant_range"] == 6.0 and record["step"] == pytest.approx(12.0 / 255)
    assert stats.totals["values"] == both.size
    assert record["clip_fraction"] == pytest.approx(float((np.abs(both) > 6.0).mean()))
    for channel, row in enumerate(record["overall"]):
        values = both[:, channel]
        assert row["min"] == pytest.approx(values.min()) and row["max"] == pytest.approx(values.max())
        assert row["mean"] == pytest.approx(values.mean(), abs=1e-5)
    assert [r["class"] for r in stats.per_class_rows] == ["a", "b"]
    assert [r["images"] for r in stats.per_class_rows] == [3, 2]
    assert stats.per_class_rows[1]["mean"] == pytest.approx(float(b.mean()), abs=1e-5)
    assert set(record["per_class"]) == {"a", "b"} and record["recommended"]["range"] > 0
    # a range set overrides the VAE's default
    narrow = latent_statistics(tmp_path, ["a", "b"], quant_range=2.0).record
    assert narrow["quant_range"] == 2.0 and narrow["clip_fraction"] == pytest.approx(float((np.abs(both) > 2.0).mean()))


def test_no_classes_give_the_settings_range_and_missing_latents_are_named(tmp_path):
    empty = latent_statistics(tmp_path, [], quant_range=9.0)
    assert empty.record["quant_range"] == 9.0 and empty.totals["values"] == 0
    assert empty.record["clip_fraction"] == 0.0 and empty.record["overall"] == []
    write_latents(tmp_path, "a", ["a1"], {"latent": np.zeros((1, 4, 2, 2), np.float32)}, {"vae": {"quant_range": 6.0}})
    with pytest.raises(MissingArtifact, match=r"^vae_latents is not materialized for 2 class\(es\): b, c\."):
        latent_statistics(tmp_path, ["a", "b", "c"])
