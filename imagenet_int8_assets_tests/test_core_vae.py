"""VAE presets and loading: random presets, local folders, the offline HF cache, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from imagenet_int8_assets.core.encode import encode_posterior
from imagenet_int8_assets.core.vae import PRESETS, VaeLoadError, build_random_vae, load_vae, resolve_device


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_random_has_the_sdxl_latent_layout_and_fixed_weights():
    model_a, info = load_vae("tiny-random")
    model_b, _ = load_vae("tiny-random")
    assert info.source == "random" and info.latent_channels == 4 and info.downsample == 8
    for (name, pa), (_, pb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(pa, pb), name
    crops = np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    mean, std = encode_posterior(model_a, crops, "cpu", batch_size=2)
    assert mean.shape == std.shape == (3, 4, 32, 32) and (std > 0).all()
    with torch.inference_mode():
        decoded = model_a.decode(torch.from_numpy(mean)).sample
    assert decoded.shape == (3, 3, 256, 256)


def test_sdxl_random_is_the_full_sdxl_architecture():
    with torch.device("meta"):
        model = build_random_vae(PRESETS["sdxl-random"].random_config)
    encoder = _params(model.encoder) + _params(model.quant_conv)
    assert encoder == pytest.approx(34.2e6, rel=0.01)
    assert model.config.scaling_factor == 0.13025 and list(model.config.block_out_channels) == [128, 256, 512, 512]


def test_batch_size_does_not_change_the_posterior():
    model, _ = load_vae("tiny-random")
    crops = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    a = encode_posterior(model, crops, "cpu", batch_size=1)
    b = encode_posterior(model, crops, "cpu", batch_size=5)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)


def test_local_folder_loads_with_its_weights_hash(tmp_path):
    model, _ = load_vae("tiny-random")
    model.save_pretrained(tmp_path / "vae")
    loaded, info = load_vae(str(tmp_path / "vae"))
    assert info.source == "local-folder" and len(info.weights_sha256) == 64
    for (name, pa), (_, pb) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(pa, pb), name


def _run_load(env: dict, spec: str) -> dict:
    code = (
        "import json, sys\n"
        "from imagenet_int8_assets.core.vae import load_vae, VaeLoadError\n"
        "try:\n"
        f"    model, info = load_vae({spec!r})\n"
        "    print(json.dumps({'ok': True, **info.as_dict(), 'params': sum(p.numel() for p in model.parameters())}))\n"
        "except VaeLoadError as exc:\n"
        "    print(json.dumps({'ok': False, 'error': str(exc)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hub_id_loads_from_the_offline_cache_and_records_the_revision(tmp_path):
    """A Hub id resolves through huggingface_hub's real cache lookup, with HF_HUB_OFFLINE=1."""
    model, _ = load_vae("tiny-random")
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
    model, info = load_vae(str(tmp_path / "missing" / "x" / "y"), fallback="tiny-random")
    assert info.is_fallback and info.source == "random" and "neither a preset" in info.fallback_reason
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(VaeLoadError, match="config.json"):
        load_vae(str(tmp_path / "noconfig"))


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(VaeLoadError, match="IMAGENET_INT8_DEVICE"):
            resolve_device("cuda")
    with pytest.raises(VaeLoadError, match="Unknown device"):
        resolve_device("tpu")
