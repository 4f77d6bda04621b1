"""The encode stage (core.latents.encode_step.encode_classes) without Dagster: stored crops of real
image files encoded by the tiny random VAE, and a changed source file refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagenet_int8_assets.core.common.layout import latents_dir
from imagenet_int8_assets.core.crops.crop_store import write_crops
from imagenet_int8_assets.core.latents.encode_step import CropsChanged, EncodeConfig, encode_classes
from imagenet_int8_assets.core.latents.latent_store import read_latents
from imagenet_int8_assets_tests.support.builds import crops

META = {"recipe": "imagenet.int8", "size": 256, "failed": []}


def _stored_crops(tmp_path, storage: str, counts: dict[str, int]):
    """Each class's crops written with ``storage``, from lossless 256x256 source files (their crop
    is themselves); returns the output and the source folder."""
    output, source = tmp_path / "out", tmp_path / "src"
    for c, (key, n) in enumerate(counts.items()):
        (source / key).mkdir(parents=True)
        images = crops(n, seed=10 * c)
        ids = [f"{key}/{i}.png" for i in range(n)]
        for name, image in zip(ids, images):
            Image.fromarray(image).save(source / name)
        write_crops(output, key, ids, images, META, storage=storage, source_root=source)
    return output, source


def test_stored_crops_are_encoded_written_and_recorded(tmp_path, tiny_vae):
    output, _ = _stored_crops(tmp_path, "raw", {"a": 3, "b": 2})
    config = EncodeConfig(output=output, batch_size=2, workers=1, device="cpu", crop_size=256)
    lines: list[str] = []

    result = encode_classes(config, ["a", "b"], lambda: (tiny_vae, "preloaded"), info=lines.append)

    assert result.written == 5 and list(result.classes) == ["a", "b"] and result.device == "cpu"
    for key, n in (("a", 3), ("b", 2)):
        record = result.classes[key]
        ids, arrays, meta = read_latents(output, key)
        assert ids == [f"{key}/{i}.png" for i in range(n)]
        assert record["images"] == n and record["path"] == str(latents_dir(output, key))
        assert arrays["latent"].shape == (n, 4, 32, 32) and np.isfinite(arrays["latent"]).all()
        assert record["non_finite_values"] == 0 and record["crops_streamed"] is False
        assert meta["device"] == "cpu" and meta["crops"] == {"recipe": "imagenet.int8", "size": 256}
        assert meta["vae"]["requested"] == "tiny-random" and meta["encode"]["batch_size"] == 2
    # the same crops give the same latents (the sampled latent is seeded per image id)
    before = read_latents(output, "b")[1]["latent"]
    assert encode_classes(config, ["b"], lambda: (tiny_vae, "preloaded")).written == 2
    assert np.array_equal(read_latents(output, "b")[1]["latent"], before)
    assert any("Loaded VAE 'tiny-random'" in line and "preloaded" in line for line in lines)


def test_a_source_file_changed_after_its_crop_was_recorded_raises_crops_changed(tmp_path, tiny_vae):
    output, source = _stored_crops(tmp_path, "none", {"a": 2})
    changed = source / "a" / "1.png"
    Image.fromarray(crops(1, seed=99)[0]).save(changed)  # same size, other pixels
    config = EncodeConfig(output=output, batch_size=2, workers=1, device="cpu", crop_size=256)

    with pytest.raises(CropsChanged) as caught:
        encode_classes(config, ["a"], lambda: (tiny_vae, "preloaded"))

    assert str(changed) in str(caught.value)
    assert not latents_dir(output, "a").exists()  # nothing written for the class
