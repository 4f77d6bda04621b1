"""The probe stages (core.quality.probe_step) without Dagster, on real stored latents."""

from __future__ import annotations

import numpy as np
import pytest

from imagenet_int8_assets.core.common.layout import MissingArtifact
from imagenet_int8_assets.core.latents.latent_store import write_latents
from imagenet_int8_assets.core.quality import probe_step
from imagenet_int8_assets.core.quality.probe import load_features, save_features
from imagenet_int8_assets.core.source.sources import ClassLabels


def _labels(keys):
    return ClassLabels("recorded", {k: 10 + i for i, k in enumerate(keys)}, {k: f"class {k}" for k in keys}, "")


def _latents(output, key, n, offset, posterior=True):
    rng = np.random.default_rng(n + int(offset))
    arrays = {"latent": rng.normal(offset, 1, size=(n, 4, 8, 8)).astype(np.float32)}
    if posterior:
        arrays["mean"] = arrays["latent"] + 0.1
        arrays["std"] = np.full_like(arrays["latent"], 0.5)
    write_latents(output, key, [f"{key}{i}" for i in range(n)], arrays, {"vae": {"quant_range": 6.0}})


def test_features_probe_and_report_of_separable_classes(tmp_path):
    keys = ["a", "b", "c"]
    for i, key in enumerate(keys):
        _latents(tmp_path, key, 30, offset=4.0 * i)
    assert probe_step.probed_classes(keys, 5, seed=0) == keys
    subset = probe_step.probed_classes(keys, 2, seed=0)
    assert len(subset) == 2 and set(subset) < set(keys) and subset == probe_step.probed_classes(keys, 2, seed=0)

    features = probe_step.collect_probe_features(tmp_path, keys, _labels(keys), per_class=20, pool=2, seed=0)
    assert sorted(set(features.labels)) == [10, 11, 12] and len(features.labels) == 60
    assert features.class_names == ["class a", "class b", "class c"]
    assert set(features.arrays) == {"sample", "mean+std"} and features.arrays["sample"].shape == (60, 4 * 2 * 2)
    assert features.warning() is None and features.nbytes() > features.arrays["sample"].nbytes

    save_features(probe_step.features_path(tmp_path), features.labels, features.class_names, features.arrays)
    labels, names, _ = load_features(probe_step.features_path(tmp_path))
    assert list(labels) == features.labels and list(names) == features.class_names
    outcome = probe_step.probe_latents(tmp_path, seed=0)
    assert outcome.note is None and outcome.result.best["accuracy"] > 0.9  # the classes are 4 sigma apart
    outcome.report.write(probe_step.report_dir(tmp_path))
    assert (probe_step.report_dir(tmp_path) / "report.html").is_file()


def test_a_latent_only_class_drops_the_posterior_set_with_advice_and_too_few_is_a_note(tmp_path):
    _latents(tmp_path, "a", 4, 0.0)
    _latents(tmp_path, "b", 4, 5.0, posterior=False)  # kept with IMAGENET_INT8_LATENT_STORAGE=latent
    features = probe_step.collect_probe_features(tmp_path, ["a", "b"], _labels(["a", "b"]), 4, 2, 0)
    assert set(features.arrays) == {"sample"} and features.incomplete == ["mean+std"]
    assert features.latent_only == ["b"] and "IMAGENET_INT8_LATENT_STORAGE=full" in features.warning()

    one_each = probe_step.collect_probe_features(tmp_path, ["a", "b"], _labels(["a", "b"]), 1, 2, 0)
    save_features(probe_step.features_path(tmp_path), one_each.labels, one_each.class_names, one_each.arrays)
    outcome = probe_step.probe_latents(tmp_path, seed=0)  # one latent per class: none to hold out
    assert outcome.note.startswith("skipped: the probe needs at least") and outcome.result is outcome.report is None

    with pytest.raises(MissingArtifact, match="materialize vae_latents first"):
        probe_step.collect_probe_features(tmp_path, ["a"], _labels(["a"]), 0, 2, 0)
