"""The probe's features file and its readiness rule (core.quality.probe.save_features / load_features /
too_few_to_probe)."""

from __future__ import annotations

import numpy as np

from imagenet_int8_assets.core.quality.probe import MIN_PER_CLASS, load_features, save_features, too_few_to_probe


def test_features_file_round_trips_atomically(tmp_path):
    rng = np.random.default_rng(0)
    sets = {"sample": rng.normal(size=(5, 16)).astype(np.float32), "mean+std": rng.normal(size=(5, 32))}
    labels = [402, 402, 7, 7, 7]
    path = tmp_path / "probe" / "features.npz"
    written = save_features(path, labels, ["tench", "acoustic guitar"], sets)
    assert written == path.stat().st_size
    back_labels, names, back_sets = load_features(path)
    np.testing.assert_array_equal(back_labels, labels)
    assert names == ["tench", "acoustic guitar"]
    assert sorted(back_sets) == ["mean+std", "sample"]
    np.testing.assert_array_equal(back_sets["sample"], sets["sample"])
    assert back_sets["sample"].dtype == np.float32
    save_features(path, [1], ["x"], {"sample": np.zeros((1, 2))})  # replaced, no temporary left
    assert load_features(path)[1] == ["x"]
    assert [p.name for p in path.parent.iterdir()] == ["features.npz"]


def test_too_few_to_probe():
    enough = np.repeat([3, 9], MIN_PER_CLASS)
    assert too_few_to_probe(enough) is None
    one_class = too_few_to_probe(np.full(10, 3))
    assert "found 1 class(es), the smallest with 10" in one_class and one_class.startswith("skipped")
    small = too_few_to_probe(np.array([3] * MIN_PER_CLASS + [9] * (MIN_PER_CLASS - 1)))
    assert f"the smallest with {MIN_PER_CLASS - 1}" in small
    assert "found 0 class(es)" in too_few_to_probe(np.array([], dtype=int))
