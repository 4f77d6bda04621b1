"""VAE presets and loading: random presets, local folders, the offline HF cache, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from imagenet_int8_assets.core.latents.encode import encode_posterior
from imagenet_int8_assets.core.latents.vae import PRESETS, VaeLoadError, build_random_vae, load_vae


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_random_has_the_sdxl_latent_layout_and_fixed_weights():
    vae_a = load_vae("tiny-random")
    vae_b = load_vae("tiny-random")
    info = vae_a.info
    assert info.source == "random" and info.latent_channels == 4 and info.downsample == 8
    for (name, pa), (_, pb) in zip(vae_a.model.state_dict().items(), vae_b.model.state_dict().items()):
        assert torch.equal(pa, pb), name
    crops = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    post = encode_posterior(vae_a, crops, "cpu", batch_size=2)
    mean, std = post.mean, post.std
    assert mean.shape == std.shape == (3, 4, 32, 32) and (std > 0).all()
    with torch.inference_mode():
        decoded = vae_a.decode(torch.from_numpy(mean))
    assert decoded.shape == (3, 3, 256, 256)


def test_sdxl_random_is_the_full_sdxl_architecture():
    with torch.device("meta"):
        model = build_random_vae(PRESETS["sdxl-random"].config)
    encoder = _params(model.encoder) + _params(model.quant_conv)
    assert encoder == pytest.approx(34.2e6, rel=0.01)
    assert model.config.scaling_factor == 0.13025 and list(model.config.block_out_channels) == [128, 256, 512, 512]


def test_batch_size_does_not_change_the_posterior():
    vae = load_vae("tiny-random")
    crops = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    a = encode_posterior(vae, crops, "cpu", batch_size=1)
    b = encode_posterior(vae, crops, "cpu", batch_size=5)
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-5)
    np.testing.assert_allclose(a.std, b.std, atol=1e-5)


def test_local_folder_loads_with_its_weights_hash(tmp_path):
    model = load_vae("tiny-random").model
    model.save_pretrained(tmp_path / "vae")
    loaded = load_vae(str(tmp_path / "vae"))
    info = loaded.info
    assert info.source == "local-folder" and len(info.weights_sha256) == 64 and info.quant_range == 12.0
    for (name, pa), (_, pb) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(pa, pb), name


def _run_load(env: dict, spec: str) -> dict:
    code = (
        "import json, sys\n"
        "from imagenet_int8_assets.core.latents.vae import load_vae, VaeLoadError\n"
        "try:\n"
        f"    vae = load_vae({spec!r})\n"
        "    print(json.dumps({'ok': True, **vae.info.as_dict(), 'params': sum(p.numel() for p in vae.model.parameters())}))\n"
        "except VaeLoadError as exc:\n"
        "    print(json.dumps({'ok': False, 'error': str(exc)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_hub_id_loads_from_the_offline_cache_and_records_the_revision(tmp_path):
    """A Hub id resolves through huggingface_hub's real cache lookup, with HF_HUB_OFFLINE=1."""
    model = load_vae("tiny-random").model
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-vae"
    model.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    result = _run_load({"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}, "acme/tiny-vae")
    assert result["ok"], result
    assert result["source"] == "hub" and result["repo_id"] == "acme/tiny-vae" and result["revision"] == revision
    assert result["params"] == sum(p.numel() for p in model.parameters())


def test_missing_weights_explain_what_to_do(tmp_path):
    result = _run_load({"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}, "stabilityai/sdxl-vae")
    assert not result["ok"]
    for hint in ("stabilityai/sdxl-vae", "HF_HUB_OFFLINE", "local folder", "HF_TOKEN", "tiny-random"):
        assert hint in result["error"]


def test_fallback_is_explicit_and_recorded(tmp_path):
    with pytest.raises(VaeLoadError, match="neither a preset"):
        load_vae("not a model id")
    info = load_vae(str(tmp_path / "missing" / "x" / "y"), fallback="tiny-random").info
    assert info.is_fallback and info.source == "random" and "neither a preset" in info.fallback_reason
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(VaeLoadError, match="config.json"):
        load_vae(str(tmp_path / "noconfig"))


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_architecture_builds_and_has_its_declared_layout(name):
    """Tiny presets encode/decode for real; full-size architectures are checked on the meta device."""
    preset = PRESETS[name]
    tiny = "tiny" in name
    device = "cpu" if tiny else "meta"
    with torch.device(device):
        model = build_random_vae(preset.config)
        x = torch.zeros(2, 3, 64, 64) if not tiny else torch.rand(2, 3, 64, 64) * 2 - 1
        if preset.family == "aura":
            z, y = model.encode(x), None
            y = model.decode(z)
        else:
            z = model.encode(x).latent_dist.mean
            y = model.decode(z).sample
    assert tuple(z.shape) == (2, preset.latent_channels, 64 // preset.downsample, 64 // preset.downsample)
    assert tuple(y.shape) == (2, 3, 64, 64)
    if preset.family != "aura":
        assert model.config.scaling_factor == preset.scaling_factor
        assert getattr(model.config, "shift_factor", None) == preset.shift_factor
    if tiny:
        assert torch.isfinite(z).all() and (preset.family != "aura" or z.abs().max() <= 8)
    assert preset.describe()["channels"] == preset.latent_channels


def test_presets_declare_sensible_ranges():
    assert PRESETS["stabilityai/sdxl-vae"].quant_range == 12.0
    assert PRESETS["madebyollin/sdxl-vae-fp16-fix"].quant_range == 12.0
    assert PRESETS["fal/AuraEquiVAE"].quant_range == 8.0 and not PRESETS["fal/AuraEquiVAE"].has_posterior
    # other VAEs get the published range in scaled-latent units: 12 * 0.13025 / scaling_factor
    assert PRESETS["stabilityai/sd-vae-ft-mse"].quant_range == pytest.approx(12 * 0.13025 / 0.18215, abs=0.01)
    assert PRESETS["flux1-vae"].quant_range == pytest.approx(12 * 0.13025 / 0.3611, abs=0.01)


@pytest.mark.slow
def test_aura_preset_loads_the_published_file_name_from_the_offline_cache(tmp_path):
    """A full-size bf16 safetensors file under the published `.pt` name, through load_vae's real path."""
    from safetensors.torch import save_file

    from imagenet_int8_assets.core.latents.aura_model import AURA_NUM_TENSORS, AuraEquiVAE
    from imagenet_int8_assets.core.latents.aura_weights import AURA_WEIGHTS_FILE

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AuraEquiVAE().state_dict().items()}
    assert len(shapes) == AURA_NUM_TENSORS
    tensors = {k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    tensors["encoder.conv_out.bias"] = torch.arange(16, dtype=torch.bfloat16)  # a value to find again
    revision = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "hub" / "models--fal--AuraEquiVAE"
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file(tensors, str(repo / "snapshots" / revision / AURA_WEIGHTS_FILE))
    del tensors
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    result = _run_load({"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}, "fal/AuraEquiVAE")
    assert result["ok"], result
    assert result["family"] == "aura" and result["revision"] == revision and result["latent_channels"] == 16
    assert result["params"] == 334_534_931 and not result["has_posterior"] and result["quant_range"] == 8.0
    assert len(result["weights_sha256"]) == 64


@pytest.mark.slow
def test_flux_preset_loads_its_vae_subfolder_from_the_offline_cache(tmp_path):
    model = load_vae("tiny-random-16").model
    revision = "1111111111111111111111111111111111111111"
    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-schnell"
    model.save_pretrained(repo / "snapshots" / revision / "vae")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    result = _run_load({"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}, "flux1-vae")
    assert result["ok"], result
    assert result["repo_id"] == "black-forest-labs/FLUX.1-schnell" and result["folder"].endswith("/vae")
    assert result["latent_channels"] == 16 and result["shift_factor"] == pytest.approx(0.1159)
    assert result["quant_range"] == pytest.approx(4.33)
