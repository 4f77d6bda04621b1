"""AuraEquiVAE: the published architecture, strict loading, latent flips and the equivariance metric."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from imagenet_int8_assets.core.common.files import file_sha256
from imagenet_int8_assets.core.latents.aura_latents import equivariance_error, hflip_latent, vflip_latent
from imagenet_int8_assets.core.latents.aura_model import (
    AURA_CONFIG,
    AURA_NUM_PARAMS,
    AURA_NUM_TENSORS,
    AttnBlock,
    AuraConfig,
    AuraEquiVAE,
    build_random_aura,
)
from imagenet_int8_assets.core.latents.aura_weights import AuraWeightsError, load_aura_state_dict

TINY = AuraConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2, head_dim=16, norm_groups=8)

PUBLISHED_SHAPES = {
    "encoder.conv_in.weight": (256, 3, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (512, 256, 1, 1),
    "encoder.mid.attn_1.qkv.weight": (3072, 1024, 1, 1),
    "encoder.conv_out.weight": (16, 1024, 3, 3),
    "decoder.conv_in.weight": (1024, 16, 3, 3),
    "decoder.up.0.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.conv_out.weight": (3, 256, 3, 3),
}


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, size, size), generator=gen) * 2 - 1


# --------------------------------------------------------------------------------------------------
# Architecture


def test_full_published_config_has_the_published_state_dict():
    with torch.device("meta"):
        model = AuraEquiVAE(AURA_CONFIG)
    state = model.state_dict()
    assert len(state) == AURA_NUM_TENSORS == 232
    assert sum(t.numel() for t in state.values()) == AURA_NUM_PARAMS == 334_534_931
    for key, shape in PUBLISHED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert all(k.startswith(("encoder.", "decoder.")) for k in state)
    # the key layout the reference describes
    assert {k for k in state if ".downsample." in k} == {
        f"encoder.down.{i}.downsample.conv.{p}" for i in range(3) for p in ("weight", "bias")
    }
    assert {k for k in state if ".upsample." in k} == {
        f"decoder.up.{i}.upsample.conv.{p}" for i in (1, 2, 3) for p in ("weight", "bias")
    }
    assert {k.split(".")[4] for k in state if k.startswith("decoder.up.") and ".block." in k} == {"0", "1", "2"}
    assert {k.split(".")[4] for k in state if k.startswith("encoder.down.") and ".block." in k} == {"0", "1"}
    assert "encoder.mid.attn_1.qkv.bias" not in state and "encoder.mid.attn_1.proj_out.bias" not in state
    assert not any("quant_conv" in k for k in state)
    assert model.latent_channels == 16 and model.downsample == 8
    # (no forward pass on meta here: the first meta conv costs seconds of one-off torch set-up;
    # the tiny-config tests run the same code path for real)


def test_config_is_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.ch = 64  # type: ignore[misc]
    with pytest.raises(ValueError, match="GroupNorm"):
        AuraConfig(ch=24, ch_mult=(1, 2), norm_groups=32)
    with pytest.raises(ValueError, match="head_dim"):
        AuraConfig(ch=32, ch_mult=(1, 2), norm_groups=8, head_dim=48)


def test_tiny_model_encodes_to_clamped_f8_latents_and_decodes_back():
    model = build_random_aura(TINY, seed=0)
    x = _images(2)
    with torch.no_grad():
        z = model.encode(x)
        y = model.decode(z)
        raw = model.encoder(x)
    assert z.shape == (2, 16, 8, 8) and y.shape == (2, 3, 64, 64)
    assert z.abs().max() <= 8.0 and torch.isfinite(y).all()
    torch.testing.assert_close(z, raw.clamp(-8, 8))
    # the same seed gives the same weights
    again = build_random_aura(TINY, seed=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # runs in bf16 too (GroupNorm statistics in float32)
    with torch.no_grad():
        zb = again.to(torch.bfloat16).encode(x.bfloat16())
    assert zb.dtype == torch.bfloat16 and zb.shape == z.shape


def test_attention_is_multi_head_over_q_k_v_chunks():
    cfg = AuraConfig(ch=16, ch_mult=(1, 2), norm_groups=4, head_dim=8)
    torch.manual_seed(0)
    block = AttnBlock(32, cfg).eval()
    x = torch.randn(2, 32, 3, 5)
    with torch.no_grad():
        got = block(x)
        q, k, v = block.qkv(block.norm(x)).flatten(2).chunk(3, dim=1)  # (B, C, L) each
        heads = 32 // 8
        q, k, v = (t.reshape(2, heads, 8, 15) for t in (q, k, v))
        weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / 8**0.5, dim=-1)
        out = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(2, 32, 3, 5)
        expected = x + block.proj_out(out)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Loading


def test_bf16_safetensors_with_a_pt_name_loads_strictly(tmp_path):
    source = build_random_aura(TINY, seed=1)
    path = tmp_path / "tiny_bf16.pt"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in source.state_dict().items()}, str(path))

    fresh = build_random_aura(TINY, seed=2)
    assert load_aura_state_dict(fresh, path) is fresh
    for (name, a), (_, b) in zip(source.state_dict().items(), fresh.state_dict().items()):
        assert b.dtype == torch.float32, name
        assert torch.equal(a.to(torch.bfloat16).float(), b), name
    # the loaded model is the bf16-rounded source model
    x = _images(1, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(x), source.to(torch.bfloat16).float().encode(x))

    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_mismatched_files_raise_a_clear_error_naming_the_file(tmp_path):
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in build_random_aura(TINY).state_dict().items()}

    missing = tmp_path / "missing_key.pt"
    save_file({k: v for k, v in state.items() if k != "decoder.mid.attn_1.qkv.weight"}, str(missing))
    with pytest.raises(AuraWeightsError) as info:
        load_aura_state_dict(build_random_aura(TINY), missing)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(missing) in message and "missing" in message and "decoder.mid.attn_1.qkv.weight" in message

    extra = tmp_path / "extra_key.pt"
    save_file({**state, "encoder.quant_conv.weight": torch.zeros(2, 2)}, str(extra))
    with pytest.raises(AuraWeightsError, match="unexpected key.*encoder.quant_conv.weight"):
        load_aura_state_dict(build_random_aura(TINY), extra)

    wrong = tmp_path / "wrong_shape.pt"
    save_file({**state, "encoder.conv_out.weight": torch.zeros(32, 64, 3, 3, dtype=torch.bfloat16)}, str(wrong))
    with pytest.raises(AuraWeightsError) as info:
        load_aura_state_dict(build_random_aura(TINY), wrong)
    message = str(info.value)
    assert str(wrong) in message and "shape" in message and "encoder.conv_out.weight" in message
    assert "(32, 64, 3, 3)" in message and "(16, 64, 3, 3)" in message

    # the full published model does not accept the tiny file either
    with torch.device("meta"):
        full = AuraEquiVAE()
    tiny_file = tmp_path / "tiny.pt"
    save_file(state, str(tiny_file))
    with pytest.raises(AuraWeightsError, match="shape mismatch"):
        load_aura_state_dict(full, tiny_file)

    pickled = tmp_path / "pickled.pt"
    torch.save(state, pickled)
    with pytest.raises(AuraWeightsError, match="safetensors"):
        load_aura_state_dict(build_random_aura(TINY), pickled)
    with pytest.raises(AuraWeightsError, match="does not exist"):
        load_aura_state_dict(build_random_aura(TINY), tmp_path / "nope.pt")


# --------------------------------------------------------------------------------------------------
# Latent flips


def _latents(kind: str, batched: bool):
    rng = np.random.default_rng(5)
    z = rng.standard_normal((3, 16, 4, 5) if batched else (16, 4, 5)).astype(np.float32)
    return torch.from_numpy(z) if kind == "torch" else z


def _equal(a, b) -> bool:
    return bool(torch.equal(a, b)) if isinstance(a, torch.Tensor) else bool(np.array_equal(a, b))


def _copy(z):
    return z.clone() if isinstance(z, torch.Tensor) else z.copy()


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("batched", [True, False])
def test_latent_flips_generate_z2_x_z2_without_mutating(kind, batched):
    z = _latents(kind, batched)
    before = _copy(z)
    h, v = hflip_latent(z), vflip_latent(z)
    assert _equal(z, before)  # input untouched
    assert type(h) is type(z) and h.shape == z.shape and h.dtype == z.dtype
    assert _equal(hflip_latent(h), z) and _equal(vflip_latent(v), z)  # involutions
    hv, vh = hflip_latent(v), vflip_latent(h)
    assert _equal(hv, vh)  # they commute
    assert not _equal(h, z) and not _equal(v, z) and not _equal(h, v) and not _equal(hv, z)  # four elements
    assert _equal(z, before)

    # the exact rule: width flip + negate [-4:-2]; height flip + negate [-2:]
    zn = np.asarray(z)
    hn, vn = np.asarray(h), np.asarray(v)
    sign_h = np.ones(16, np.float32)
    sign_h[12:14] = -1
    sign_v = np.ones(16, np.float32)
    sign_v[14:16] = -1
    np.testing.assert_array_equal(hn, zn[..., ::-1] * sign_h[:, None, None])
    np.testing.assert_array_equal(vn, zn[..., ::-1, :] * sign_v[:, None, None])


def test_latent_flips_match_the_model_card_recipe():
    z = _latents("torch", True)
    card = torch.flip(z, [-1])
    card[:, -4:-2] = -card[:, -4:-2]
    assert torch.equal(hflip_latent(z), card)
    card = torch.flip(z, [-2])
    card[:, -2:] = -card[:, -2:]
    assert torch.equal(vflip_latent(z), card)
    with pytest.raises(ValueError):
        hflip_latent(torch.zeros(16, 4))


# --------------------------------------------------------------------------------------------------
# Equivariance metric


def _block_encoder(x: np.ndarray) -> np.ndarray:
    """An exactly equivariant f8 encoder in numpy: per 8x8 block, even features in channels 0..11,
    right-minus-left (odd under hflip) in 12..13, bottom-minus-top (odd under vflip) in 14..15."""
    x = np.asarray(x, dtype=np.float64)
    *lead, c, hh, ww = x.shape
    b = x.reshape(*lead, c, hh // 8, 8, ww // 8, 8)
    mean = b.mean(axis=(-3, -1))
    sq = (b**2).mean(axis=(-3, -1))
    horiz = b[..., 4:].mean(axis=(-3, -1)) - b[..., :4].mean(axis=(-3, -1))
    vert = b[..., 4:, :, :].mean(axis=(-3, -1)) - b[..., :4, :, :].mean(axis=(-3, -1))
    even = [mean, sq, mean**3, horiz**2 + vert**2]  # 4 x 3 = 12 channels
    return np.concatenate([*even, horiz[..., :2, :, :], vert[..., 1:, :, :]], axis=-3)


def _symmetrized(f):
    """e(x) = mean over the group of g^-1(f(g x)): exactly equivariant for any f."""

    def h_img(x):
        return torch.flip(x, [-1])

    def v_img(x):
        return torch.flip(x, [-2])

    def encode(x):
        terms = [
            f(x),
            hflip_latent(f(h_img(x))),
            vflip_latent(f(v_img(x))),
            hflip_latent(vflip_latent(f(v_img(h_img(x))))),
        ]
        return torch.stack(terms).double().mean(0)

    return encode


def test_equivariance_error_is_zero_for_equivariant_encoders():
    x = _images(2).numpy()
    for err in (equivariance_error(_block_encoder, x), equivariance_error(_block_encoder, x[0])):
        for flip in ("hflip", "vflip"):
            assert set(err[flip]) == {"relative", "max_steps", "rms_steps"}
            assert err[flip]["relative"] < 1e-12 and err[flip]["max_steps"] < 1e-9

    model = build_random_aura(TINY, seed=0)
    err = equivariance_error(_symmetrized(model.encode), _images(2, seed=1))
    for flip in ("hflip", "vflip"):
        assert err[flip]["relative"] < 1e-5, err
        assert err[flip]["max_steps"] < 1e-3, err


def test_equivariance_error_is_clearly_nonzero_for_a_random_model():
    model = build_random_aura(TINY, seed=0)
    x = _images(2, seed=1)
    err = equivariance_error(model.encode, x)
    for flip in ("hflip", "vflip"):
        assert err[flip]["relative"] > 0.05, err
        assert err[flip]["max_steps"] > err[flip]["rms_steps"] > 0
    # the step is 16/255 by default: halving the range doubles the error in steps
    half = equivariance_error(model.encode, x, value_range=4.0)
    assert half["hflip"]["rms_steps"] == pytest.approx(2 * err["hflip"]["rms_steps"])
    assert half["hflip"]["relative"] == pytest.approx(err["hflip"]["relative"])
