"""Atomic writes and the crop/latent layout."""

from __future__ import annotations

import numpy as np
import pytest

from imagenet_int8_assets.core.common.layout import MissingArtifact
from imagenet_int8_assets.core.common.files import atomic_dir, remove_leftovers
from imagenet_int8_assets.core.crops.crop_store import read_crops, write_crops
from imagenet_int8_assets.core.latents.latent_store import read_latents, write_latents


def test_failed_write_leaves_the_previous_version(tmp_path):
    final = tmp_path / "part"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("killed")
    assert (final / "a").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["part"]


def test_leftovers_of_a_killed_run_are_removed_on_rewrite(tmp_path):
    final = tmp_path / "part"
    (tmp_path / ".tmp-part-deadbeef").mkdir()  # what SIGKILL mid-write leaves
    (tmp_path / ".trash-part-cafebabe").mkdir()
    (tmp_path / ".tmp-other-01234567").mkdir()
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("v2")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".tmp-other-01234567", "part"]
    assert remove_leftovers(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == ["part"]


def test_crops_round_trip_and_public_reader(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    write_crops(tmp_path, "cls", ["cls/a", "cls/b", "cls/c"], images, {"recipe": "adm", "size": 16})
    ids, back = read_crops(tmp_path, "cls")
    assert ids == ["cls/a", "cls/b", "cls/c"]
    np.testing.assert_array_equal(back, images)
    ids, mapped = read_crops(tmp_path, "cls", mmap=True)
    np.testing.assert_array_equal(mapped, images)
    write_crops(tmp_path, "empty", [], np.zeros((0, 16, 16, 3), np.uint8), {"recipe": "adm", "size": 16})
    ids, back = read_crops(tmp_path, "empty", mmap=True)
    assert ids == [] and back.shape == (0, 16, 16, 3)
    with pytest.raises(MissingArtifact, match="preprocessed_crops"):
        read_crops(tmp_path, "missing")


def test_latents_round_trip(tmp_path):
    mean = np.random.default_rng(0).normal(size=(2, 4, 4, 4)).astype(np.float32)
    write_latents(tmp_path, "cls", ["x/é", "x/b"], {"mean": mean, "latent": mean * 2}, {"seed": 3})
    ids, arrays, meta = read_latents(tmp_path, "cls")
    assert ids == ["x/é", "x/b"] and meta["seed"] == 3 and meta["count"] == 2
    np.testing.assert_array_equal(arrays["latent"], mean * 2)
    with pytest.raises(ValueError):
        write_latents(tmp_path, "bad", ["only-one"], {"mean": mean}, {})
