"""The stored latent value: deterministic per image, independent of batching and order."""

from __future__ import annotations

import numpy as np
import pytest

from imagenet_int8_assets.core.encode import image_seed, non_finite_count, select_latent, standard_normal


def test_sample_is_seeded_by_run_seed_and_image_id():
    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=(3, 4, 8, 8)).astype(np.float32), rng.uniform(0.1, 1, (3, 4, 8, 8)).astype(np.float32)
    ids = ["a/1.JPEG", "a/2.JPEG", "b/3.JPEG"]
    first = select_latent(mean, std, ids, "sample", run_seed=7)
    np.testing.assert_array_equal(first, select_latent(mean, std, ids, "sample", run_seed=7))
    # order and batching do not matter: each image's noise depends only on (seed, id)
    reordered = select_latent(mean[::-1], std[::-1], ids[::-1], "sample", run_seed=7)
    np.testing.assert_array_equal(first, reordered[::-1])
    np.testing.assert_array_equal(first[1:2], select_latent(mean[1:2], std[1:2], ids[1:2], "sample", 7))
    assert not np.array_equal(first, select_latent(mean, std, ids, "sample", run_seed=8))
    np.testing.assert_allclose(first[0], mean[0] + std[0] * standard_normal(ids[0], 7, (4, 8, 8)))
    noise = (first - mean) / std
    assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2
    np.testing.assert_array_equal(select_latent(mean, std, ids, "mean", 7), mean)
    with pytest.raises(ValueError, match="IMAGENET_INT8_LATENT_VALUE"):
        select_latent(mean, std, ids, "mode", 7)


def test_image_seed_is_stable():
    assert image_seed(0, "n01440764/x.JPEG") == image_seed(0, "n01440764/x.JPEG")
    assert image_seed(0, "a") != image_seed(1, "a") != image_seed(0, "b")
    assert 0 <= image_seed(123, "é") < 2**63


def test_non_finite_count():
    assert non_finite_count(np.array([1.0, np.nan, np.inf]), np.array([-np.inf, 0.0])) == 3
    assert non_finite_count(np.zeros(4)) == 0
