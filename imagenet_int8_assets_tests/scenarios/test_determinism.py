"""What is bit-identical, and the codec's edges.

On the CPU an image's latent must not depend on the batch size, its position in the batch or the
other images in the batch, for a given thread count (a batch that does not divide over the threads
used to change about one code in 30,000); the quantizer must refuse NaN/Inf itself.
"""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pytest
import torch

from imagenet_int8_assets.core.latents.encode import encode_posterior, forward_batch_size
from imagenet_int8_assets.core.latents.quantize import ChannelStats, quantize
from imagenet_int8_assets.core.common.layout import latents_dir, mds_root
from imagenet_int8_assets.core.latents.latent_store import read_latents
from imagenet_int8_assets.core.latents.vae import load_vae
from imagenet_int8_assets.definitions import build_definitions
from imagenet_int8_assets.resources import ImagenetInt8Settings
from imagenet_int8_assets_tests.support.builds import (
    crops,
    make_image_folder,
    materialize_all,
    torch_threads,
)


def test_quantize_refuses_nan_and_inf_saying_how_many():
    z = np.zeros((2, 4, 8, 8), np.float32)
    z[0, 0, 0, :2] = np.nan
    z[1, 3, 7, 7] = np.inf
    z[1, 2, 0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"cannot quantize 4 of 512 latent values: they are NaN or infinite .*re-encode"):
        quantize(z)
    for bad_range in (float("inf"), float("nan"), 0.0, -12.0):
        with pytest.raises(ValueError, match="IMAGENET_INT8_QUANT_RANGE"):
            quantize(np.zeros(3), bad_range)
    assert quantize(np.array([-12.0, 0.0, 12.0]), np.float32(12.0)).tolist() == [0, 128, 255]


def test_statistics_still_count_non_finite_values_instead_of_failing():
    z = np.ones((1, 2, 2, 2))
    z[0, 1, 0, 0] = np.nan
    stats = ChannelStats(2)
    stats.update(z)
    assert stats.non_finite.tolist() == [0, 1] and stats.count.tolist() == [4, 3]


def test_forward_batches_on_the_cpu_are_a_multiple_of_the_thread_count():
    with torch_threads(3):
        assert [forward_batch_size("cpu", b) for b in (1, 2, 3, 4, 16)] == [3, 3, 3, 3, 15]
        assert forward_batch_size("cuda", 16) == forward_batch_size("cuda:1", 5) + 11  # GPU: as configured
    with pytest.raises(ValueError, match="IMAGENET_INT8_BATCH_SIZE"):
        forward_batch_size("cpu", 0)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_cpu_latent_does_not_depend_on_batch_size_position_or_companions(threads):
    """For a given thread count. Across thread counts the bytes can differ on some CPUs: on AMD EPYC
    with AVX-512 (torch 2.13, oneDNN 3.12) one and two threads give floats up to 2.4e-7 apart (its
    convolutions sum in another order), while on the machines before they were identical (docs/GUARANTEES.md,
    Reproducibility)."""
    vae = load_vae("tiny-random").to("cpu")
    images, others = crops(5), crops(4, seed=100)
    with torch_threads(threads):
        alone = np.stack([encode_posterior(vae, images[i : i + 1], "cpu", batch_size=1).mean[0] for i in range(5)])
        runs = []
        for batch in (1, 3, 16):
            runs.append(((batch, "in order"), encode_posterior(vae, images, "cpu", batch_size=batch).mean))
            reverse = encode_posterior(vae, images[::-1], "cpu", batch_size=batch).mean[::-1]
            runs.append(((batch, "reversed"), reverse))
            mixed = encode_posterior(vae, np.concatenate([others[:3], images, others[3:]]), "cpu", batch_size=batch).mean
            runs.append(((batch, "among other images"), mixed[3:8]))
    for what, means in runs:
        assert means.tobytes() == alone.tobytes(), f"{threads} thread(s), batch size, order = {what}"


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    """The same source built twice through Dagster, with batch sizes 1 and 3, on 2 CPU threads."""
    tmp = tmp_path_factory.mktemp("determinism")
    source = make_image_folder(tmp / "src", {"c0": 4, "c1": 3})
    out = {}
    with torch_threads(2):
        for batch in (1, 3):
            settings = ImagenetInt8Settings(
                source=str(source), output=str(tmp / f"out{batch}"), vae="tiny-random", device="cpu", workers=1, batch_size=batch
            )
            instance = dg.DagsterInstance.ephemeral()
            results = materialize_all(build_definitions(settings, partitions_per_run=10), instance)
            assert all(r.success for r in results)
            out[batch] = (settings, instance)
    return out


@pytest.mark.slow
def test_rebuilds_with_other_batch_sizes_give_identical_bytes(two_builds):
    (one, _), (three, _) = two_builds[1], two_builds[3]
    for key in ("c0", "c1"):
        ids1, a1, _ = read_latents(one.output_path, key)
        ids3, a3, _ = read_latents(three.output_path, key)
        assert ids1 == ids3
        for name in ("mean", "std", "latent"):
            assert a1[name].tobytes() == a3[name].tobytes(), (key, name)

    def shard_hashes(settings):
        index = json.loads((mds_root(settings.output_path) / "index.json").read_text())
        return [s["raw_data"]["hashes"] for s in index["shards"]]

    assert shard_hashes(one) == shard_hashes(three) and len(shard_hashes(one)) == 2


def test_the_encode_batch_size_is_recorded_with_the_latents(two_builds):
    for batch, (settings, instance) in two_builds.items():
        meta = json.loads((latents_dir(settings.output_path, "c0") / "meta.json").read_text())
        assert meta["encode"] == {
            "device_type": "cpu",
            "batch_size": batch,
            "forward_batch_size": 2,
            "cpu_threads": 2,
            "torch": torch.__version__,
        }
        record = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("vae_latents"), asset_partitions=["c0"]), limit=1
        ).records[0]
        assert record.asset_materialization.metadata["encode_batch_size"].value == batch
