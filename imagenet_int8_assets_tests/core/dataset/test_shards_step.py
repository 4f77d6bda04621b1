"""The mds_shards stage (core.dataset.shards_step) without Dagster, on real stored latents."""

from __future__ import annotations

import numpy as np
import pytest

from imagenet_int8_assets.core.common.layout import mds_root
from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.dataset.shards_step import NonFiniteLatents, write_class_version
from imagenet_int8_assets.core.latents.latent_store import write_latents
from imagenet_int8_assets.core.latents.quantize import quantize


class Space:
    """Records what the stage says it writes, and whether the write ran inside the guard."""

    def __init__(self):
        self.calls, self.inside = [], 0

    def __call__(self, images, nbytes, key):
        self.calls.append((images, nbytes, key))
        return self

    def guard(self):
        import contextlib

        @contextlib.contextmanager
        def block():
            self.inside += 1
            yield self

        return block()


def test_a_class_is_quantized_at_its_recorded_range_and_rewritten_as_a_new_version(tmp_path):
    rng = np.random.default_rng(0)
    latent = rng.normal(0, 3, size=(3, 4, 4, 4)).astype(np.float32)
    write_latents(tmp_path, "a", ["a1", "a2", "a3"], {"latent": latent}, {"vae": {"quant_range": 6.0}, "seed": 0})
    space = Space()

    first = write_class_version(tmp_path, "a", 7, "seven", 0.0, space=space)  # 0: the VAE's recorded range

    assert first.samples == 3 and first.value_range == 6.0 and first.key == "a"
    assert space.calls == [(3, latent.size, "a")] and space.inside == 1
    assert first.folder.parent == mds_root(tmp_path) / "classes" / "a"
    assert mds_index.index_sample_count(mds_index.read_index(first.folder)) == 3
    from imagenet_int8_assets.core.dataset.mds import open_streaming

    import imagenet_int8_assets.reader  # noqa: F401  (registers the 'uint8' encoding)

    dataset = open_streaming(local=str(first.folder), batch_size=1, shuffle=False)
    try:
        codes = np.stack([np.frombuffer(dataset[i]["vae_output"], np.uint8) for i in range(3)])
        assert np.array_equal(codes, quantize(latent, 6.0).reshape(3, -1))
        assert {dataset[i]["label"] for i in range(3)} == {"7"}  # the published schema: label as str and dataset[0]["label_as_text"] == "seven"
    finally:
        del dataset

    second = write_class_version(tmp_path, "a", 7, "seven", 2.0)  # the setting overrides the VAE's range
    assert second.value_range == 2.0 and second.folder != first.folder
    assert not first.folder.exists()  # an unpublished older version is removed


def test_non_finite_latents_write_nothing_and_say_what_to_do(tmp_path):
    latent = np.zeros((2, 4, 2, 2), np.float32)
    latent[1, 0, 0, 0] = np.nan
    write_latents(tmp_path, "b", ["b1", "b2"], {"latent": latent}, {"vae": {"quant_range": 6.0}})
    with pytest.raises(NonFiniteLatents, match=r"^b: 1 non-finite latent values; re-materialize vae_latents"):
        write_class_version(tmp_path, "b", 0, "b", 0.0)
    assert not (mds_root(tmp_path) / "classes" / "b").exists()
