"""Whole-graph runs with other VAEs and layouts: 16 channels, 512 crops, flips, precisions."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pytest

from imagenet_int8_assets.core.common.layout import mds_root
from imagenet_int8_assets.core.latents.latent_store import read_latents
from imagenet_int8_assets.definitions import build_definitions
from imagenet_int8_assets.reader import open_dataset
from imagenet_int8_assets.resources import ImagenetInt8Settings
from imagenet_int8_assets_tests.support.builds import make_image_folder, materialize_all


def _build(tmp_path, **options):
    source = make_image_folder(tmp_path / "src", {"n01440764": 3, "n02676566": 2})
    settings = ImagenetInt8Settings(
        source=str(source), output=str(tmp_path / "out"), device="cpu", workers=1, **options
    )
    defs = build_definitions(settings, partitions_per_run=10)
    instance = dg.DagsterInstance.ephemeral()
    results = materialize_all(defs, instance)
    assert all(r.success for r in results)
    return settings, instance


def _metadata(instance, key, partition=None):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None), limit=1
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


@pytest.mark.slow
@pytest.mark.parametrize("vae", ["tiny-random-16", "aura-tiny-random"])
def test_sixteen_channel_presets_flow_through_the_graph(tmp_path, vae):
    settings, instance = _build(tmp_path, vae=vae, store_flip=True)
    root = mds_root(settings.output_path)
    info = json.loads((root / "build.json").read_text())
    assert info["latent_shape"] == [16, 32, 32]
    assert info["schema"]["vae_output"] == "ndarray:uint8:16,32,32" == info["schema"]["vae_output_flip"]
    expected_range = 8.0 if vae.startswith("aura") else 4.33
    assert info["quant_range"] == expected_range and info["dequantize"] == f"z = (u / 255 - 0.5) * {2 * expected_range:g}"
    ds = open_dataset(root)
    assert len(ds) == 5
    sample = ds[0]
    assert sample["latent"].shape == sample["latent_flip"].shape == (16, 32, 32)
    assert np.abs(sample["latent"]).max() <= expected_range
    ids, arrays, meta = read_latents(settings.output_path, "n01440764")
    assert ("std" in arrays) == (vae != "aura-tiny-random")
    assert "quant_range" not in meta  # the latents do not depend on the range; the codes record it (above)
    latents_meta = _metadata(instance, "vae_latents", "n01440764")
    assert latents_meta["latent_shape"] == "(16, 32, 32)" and latents_meta["stored_flip"] is True
    if vae.startswith("aura"):
        err = latents_meta["equivariance_error"]
        assert set(err) == {"hflip", "vflip"} and err["hflip"]["relative"] > 0  # random weights: not equivariant
        assert meta["latent_value"] == "latent (no posterior)"
    stats = _metadata(instance, "quantization_stats")
    assert stats["quant_range"] == expected_range and len(stats["recommended_per_channel"]) == 16


@pytest.mark.slow
def test_512_crops_give_4x64x64_latents(tmp_path):
    settings, instance = _build(tmp_path, vae="tiny-random", crop_size=512)
    info = json.loads((mds_root(settings.output_path) / "build.json").read_text())
    assert info["latent_shape"] == [4, 64, 64] and info["schema"]["vae_output"] == "ndarray:uint8:4,64,64"
    assert open_dataset(mds_root(settings.output_path))[0]["latent"].shape == (4, 64, 64)


@pytest.mark.slow
def test_low_precision_is_reported_against_fp32(tmp_path):
    settings, instance = _build(tmp_path, vae="tiny-random", precision="bf16")
    meta = _metadata(instance, "vae_latents", "n01440764")
    assert meta["precision"] == "bf16" and meta["reencoded_in_fp32"] == 0
    report = meta["precision_vs_fp32"]
    assert set(report) == {"bf16"}  # on a GPU fp16 is compared too
    row = report["bf16"]
    assert row["precision"] == "bf16" and row["images"] == 3 and 0 < row["rms_steps"] <= row["max_steps"] < 20
    info = json.loads((mds_root(settings.output_path) / "build.json").read_text())
    # the published schema where it fits: 4x32x32 at +-12
    assert info["schema"]["vae_output"] == "uint8" and info["precision"] == "bf16"
