"""Latent probe: features, seeded subsampling, the five-model probe, tables and figures."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from imagenet_int8_assets.core.quality.probe import (
    DEFAULT_MODELS,
    LOGISTIC,
    MEAN_STD,
    SAMPLE,
    build_feature_sets,
    pool_features,
    run_probe,
    stratified_subsample,
)
from imagenet_int8_assets.core.quality.probe_report import (
    CHANCE_ROW,
    RANDOM_ROW,
    accuracy_table_markdown,
    confusion_matrix_png,
    feature_density_png,
    full_table_markdown,
    full_table_rows,
    pca_scatter_png,
)

CLASSES = 5
NAMES = [f"class_{k}" for k in range(CLASSES)]


def separable_latents(per_class=40, shape=(4, 8, 8), seed=0):
    """Class k: every channel's mean shifted by k (sample and mean), std growing with k; unit noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), per_class)
    shift = labels[:, None, None, None].astype(np.float32)
    mean = shift + rng.normal(size=(len(labels), *shape)).astype(np.float32)
    std = 0.5 + 0.1 * shift + 0.05 * rng.random((len(labels), *shape)).astype(np.float32)
    sample = mean + std * rng.normal(size=mean.shape).astype(np.float32)
    return sample, mean, std, labels


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On data this small, OpenMP threads only add synchronisation (HistGradientBoosting runs ~8x
    slower with 2 threads than with 1 on a busy 2-core runner)."""
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def separable_result(one_thread):
    sample, mean, std, labels = separable_latents()
    features = build_feature_sets(sample, mean, std, pool=4)
    return run_probe(features, labels, NAMES, seed=0), features, labels


# --------------------------------------------------------------------------- features


def test_pool_features_shapes_and_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 8, 8)).astype(np.float32)
    assert pool_features(x, 4).shape == (3, 4 * 4 * 4)
    assert pool_features(x, 1).shape == (3, 4)
    np.testing.assert_array_equal(pool_features(x, 8), x.reshape(3, -1))  # size == H: flatten only
    np.testing.assert_allclose(pool_features(x, 1), x.mean(axis=(2, 3)), rtol=1e-6, atol=1e-6)
    constant = np.full((2, 4, 8, 8), 3.25, np.float32)
    np.testing.assert_allclose(pool_features(constant, 2), 3.25)
    # each 2x2 block of an arange map averages to its own centre value
    ramp = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    np.testing.assert_allclose(pool_features(ramp, 2), [[2.5, 4.5, 10.5, 12.5]])
    assert pool_features(np.full((1, 1, 4, 4), 200, np.uint8), 2).dtype == np.float32
    with pytest.raises(ValueError):
        pool_features(x, 3)
    with pytest.raises(ValueError):
        pool_features(x[0], 4)


def test_build_feature_sets():
    sample, mean, std, _ = separable_latents(per_class=2)
    only = build_feature_sets(sample, pool=4)
    assert list(only) == [SAMPLE] and only[SAMPLE].shape == (10, 64)
    both = build_feature_sets(sample, mean, std, pool=4)
    assert list(both) == [SAMPLE, MEAN_STD] and both[MEAN_STD].shape == (10, 128)
    np.testing.assert_allclose(both[MEAN_STD][:, :64], pool_features(mean, 4))
    np.testing.assert_allclose(both[MEAN_STD][:, 64:], pool_features(std, 4))
    assert build_feature_sets(sample, pool=8)[SAMPLE].shape == (10, 256)
    assert build_feature_sets(sample, pool=None)[SAMPLE].shape == (10, 256)
    with pytest.raises(ValueError):
        build_feature_sets(sample, mean=mean)


def test_stratified_subsample_is_capped_and_seeded():
    labels = np.array([0] * 30 + [1] * 5 + [2] * 12)
    idx = stratified_subsample(labels, per_class=10, seed=3)
    counts = np.bincount(labels[idx], minlength=3)
    assert counts.tolist() == [10, 5, 10]
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, stratified_subsample(labels, per_class=10, seed=3))
    assert not np.array_equal(idx, stratified_subsample(labels, per_class=10, seed=4))


# --------------------------------------------------------------------------- probe


def test_separable_latents_are_told_apart(separable_result):
    result, _, _ = separable_result
    assert result.models == list(DEFAULT_MODELS)
    assert result.feature_sets == [SAMPLE, MEAN_STD]
    assert len(result.table) == len(DEFAULT_MODELS) * 2
    assert result.stratified and result.n_train == 150 and result.n_test == 50
    assert result.chance["uniform"] == pytest.approx(0.2)
    assert result.chance["accuracy"] == pytest.approx(0.2)  # stratified test split, 10 per class
    for row in result.table:
        assert set(row) == {"model", "features", "accuracy", "precision", "recall", "f1", "seconds"}
        assert row["accuracy"] >= 0.8, row  # chance is 0.2; every model, both feature sets
        assert row["f1"] >= 0.75, row
        assert row["seconds"] >= 0
    for fs in result.feature_sets:
        assert max(result.accuracy(m, fs) for m in result.models) >= 0.9
    best = result.best
    assert best["accuracy"] == max(r["accuracy"] for r in result.table)
    cm = best["confusion_matrix"]
    assert isinstance(cm, np.ndarray) and cm.shape == (CLASSES, CLASSES) and cm.sum() == result.n_test
    assert best["class_names"] == NAMES
    assert any("early_stopping off" in n for n in result.notes)


def test_probe_is_reproducible():
    sample, _, _, labels = separable_latents(per_class=12, shape=(4, 4, 4), seed=5)
    features = build_feature_sets(sample)
    models = [LOGISTIC, "Random Forest", "HistGradientBoosting"]
    a = run_probe(features, labels, NAMES, seed=1, models=models)
    b = run_probe(features, labels, NAMES, seed=1, models=models)
    strip = lambda t: [{k: v for k, v in r.items() if k != "seconds"} for r in t]  # noqa: E731
    assert strip(a.table) == strip(b.table)
    np.testing.assert_array_equal(a.test_index, b.test_index)
    assert a.models == models and not any("n_neighbors capped" in n for n in a.notes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_latents_stay_near_chance(seed):
    """Labels independent of the latents: a model's test accuracy is a draw around 1/k.

    With a balanced stratified test split of n = 100 (20 per class) and predictions independent
    of the test labels, accuracy has mean 1/k = 0.2 and standard deviation at most
    sqrt(0.2 * 0.8 / 100) = 0.04. The bound 1/k + 5 sd = 0.4 fails by chance with probability
    < 1e-6 per (model, feature set), so 10 checks x 3 seeds stay sound; not tuned to one seed.
    """
    rng = np.random.default_rng(100 + seed)
    per_class = 80
    labels = rng.permutation(np.repeat(np.arange(CLASSES), per_class))
    shape = (len(labels), 4, 4, 4)
    mean = rng.normal(size=shape).astype(np.float32)
    std = np.abs(rng.normal(size=shape)).astype(np.float32) + 0.1
    sample = mean + std * rng.normal(size=shape).astype(np.float32)
    result = run_probe(build_feature_sets(sample, mean, std), labels, NAMES, seed=seed)
    assert result.n_test == 100
    p = result.chance["uniform"]
    bound = p + 5 * np.sqrt(p * (1 - p) / result.n_test)
    assert bound == pytest.approx(0.4)
    accuracies = [r["accuracy"] for r in result.table]
    assert max(accuracies) <= bound, result.table
    assert abs(np.mean(accuracies) - p) <= 0.1  # the average of 10 draws sits near chance too
    assert result.chance["accuracy"] == pytest.approx(0.2)


def test_split_falls_back_when_a_class_is_too_small():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 10 + [1] * 10 + [2] * 1)
    x = rng.normal(size=(len(labels), 6)) + labels[:, None]
    result = run_probe({SAMPLE: x}, labels, ["a", "b", "c"], seed=0, models=[LOGISTIC, "KNN (n=25)"])
    assert not result.stratified
    assert any("Stratified split impossible" in n for n in result.notes)
    assert result.n_train == 15 and any("n_neighbors capped at 15" in n for n in result.notes)
    assert result.best["confusion_matrix"].shape == (3, 3)


def test_probe_rejects_bad_input():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError):
        run_probe({SAMPLE: x}, np.zeros(10, int), ["a", "b"])  # one class
    with pytest.raises(ValueError):
        run_probe({SAMPLE: x}, np.arange(10) % 2, ["a", "b"], models=["Nope"])
    with pytest.raises(ValueError):
        run_probe({SAMPLE: x[:9]}, np.arange(10) % 2, ["a", "b"])
    with pytest.raises(ValueError):
        run_probe({SAMPLE: x}, np.arange(10) % 3, ["a", "b"])  # label 2 has no name


# --------------------------------------------------------------------------- tables


def test_accuracy_table_markdown(separable_result):
    result, _, _ = separable_result
    md = accuracy_table_markdown(result)
    lines = md.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Model", "Accuracy sample", "Accuracy mean+std", "Macro F1 sample", "Macro F1 mean+std"]
    first_cells = [line.strip("|").split("|")[0].strip() for line in lines[2:]]
    assert first_cells == [*DEFAULT_MODELS, CHANCE_ROW, RANDOM_ROW]
    assert all(line.count("|") == len(header) + 1 for line in lines)
    assert "0.200" in lines[-1]

    sample_only = run_probe({SAMPLE: separable_result[1][SAMPLE]}, separable_result[2], NAMES, models=[LOGISTIC])
    header = accuracy_table_markdown(sample_only).splitlines()[0]
    assert "mean+std" not in header and "Accuracy sample" in header


def test_full_table_rows(separable_result):
    result, _, _ = separable_result
    rows = full_table_rows(result)
    assert len(rows) == len(result.table) + 1 and rows[-1]["model"] == CHANCE_ROW
    for row in rows:
        assert list(row) == ["model", "features", "accuracy", "precision", "recall", "f1", "seconds"]
    assert full_table_markdown(result).count("\n") == len(rows) + 1
    summary = result.as_dict()
    assert isinstance(summary["best"]["confusion_matrix"], list)


# --------------------------------------------------------------------------- figures


def _open_png(png: bytes) -> Image.Image:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.width > 100 and image.height > 100
    return image


def test_figures_are_pngs(separable_result):
    result, features, labels = separable_result
    _open_png(confusion_matrix_png(result))
    _open_png(pca_scatter_png(features[SAMPLE], labels, NAMES))
    _open_png(feature_density_png(features[SAMPLE], labels, NAMES, n_features=4))


def test_figures_handle_many_classes_and_degenerate_columns():
    rng = np.random.default_rng(0)
    k = 40
    labels = np.repeat(np.arange(k), 3)
    names = [f"n{i:02d}" for i in range(k)]
    x = rng.normal(size=(len(labels), 3))
    x[labels == 0, 0] = 1.0  # a constant class column: histogram fallback instead of a KDE
    _open_png(pca_scatter_png(x, labels, names, max_points=100))
    _open_png(feature_density_png(x, labels, names, n_features=6))  # capped at the 3 columns
    _open_png(pca_scatter_png(x[:, :1], labels, names))  # one feature: PC 2 is flat
