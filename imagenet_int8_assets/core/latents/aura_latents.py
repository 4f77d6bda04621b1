"""AuraEquiVAE's latent space: its bound (+-8) and the Z2 x Z2 flip equivariance.

- horizontal flip of the image == flip ``z`` along width AND negate channels ``[-4:-2]``;
- vertical flip of the image   == flip ``z`` along height AND negate channels ``[-2:]``.

So flip augmentation can be applied to stored latents without re-encoding (``hflip_latent``,
``vflip_latent``), and ``equivariance_error`` measures how well a given encoder honours that.

Importing this module does not import torch (the VAE presets read ``AURA_CLAMP`` when the
definitions load): the flip helpers take numpy arrays, and torch tensors when torch is in use.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from imagenet_int8_assets.core.latents.quantize import step

AURA_CLAMP = 8.0  # the encoder's output is clamped to [-AURA_CLAMP, AURA_CLAMP]: the latents' range

HFLIP_CHANNELS = slice(-4, -2)  # negated by a horizontal flip
VFLIP_CHANNELS = slice(-2, None)  # negated by a vertical flip


def _tensor_module(a: Any):
    """torch when ``a`` is a torch tensor, else None (without importing torch: a tensor exists
    only once torch has been imported)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(a, torch.Tensor) else None


def _flip_latent(z: Any, spatial_dim: int, channels: slice) -> Any:
    if z.ndim not in (3, 4):
        raise ValueError(f"expected a latent (C, H, W) or (N, C, H, W), got shape {tuple(z.shape)}")
    if z.shape[-3] < 4:
        raise ValueError(f"latent needs at least 4 channels to flip, got shape {tuple(z.shape)}")
    torch = _tensor_module(z)
    if torch is not None:
        out = torch.flip(z, dims=[spatial_dim])  # a new tensor
    else:
        out = np.flip(np.asarray(z), axis=spatial_dim).copy()
    index = (Ellipsis, channels, slice(None), slice(None))
    out[index] = -out[index]
    return out


def hflip_latent(z: Any) -> Any:
    """The latent of the horizontally flipped image: flip width, negate channels [-4:-2]."""
    return _flip_latent(z, -1, HFLIP_CHANNELS)


def vflip_latent(z: Any) -> Any:
    """The latent of the vertically flipped image: flip height, negate channels [-2:]."""
    return _flip_latent(z, -2, VFLIP_CHANNELS)


def _flip_image(x: Any, spatial_dim: int) -> Any:
    torch = _tensor_module(x)
    if torch is not None:
        return torch.flip(x, dims=[spatial_dim])
    return np.flip(np.asarray(x), axis=spatial_dim).copy()


def _as_float64(a: Any) -> np.ndarray:
    torch = _tensor_module(a)
    if torch is not None:
        a = a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def equivariance_error(
    encode_fn: Callable[[Any], Any], x: Any, value_range: float = AURA_CLAMP
) -> dict[str, dict[str, float]]:
    """How far ``encode_fn`` is from the flip equivariance, for both flips.

    Compares ``a = encode(flip(x))`` with ``b = flip_latent(encode(x))``; per flip returns
    ``relative`` = ||a - b|| / ||b||, and ``max_steps`` / ``rms_steps``: the max and RMS absolute
    error in quantization steps of an 8-bit code over [-value_range, value_range]
    (step = 2 * value_range / 255). ``x`` is an image batch (N, 3, H, W) or (3, H, W), torch or numpy.
    """
    import torch

    unit = step(value_range)
    with torch.no_grad():
        base = encode_fn(x)
        result: dict[str, dict[str, float]] = {}
        for name, spatial_dim, flip_latent in (("hflip", -1, hflip_latent), ("vflip", -2, vflip_latent)):
            a = _as_float64(encode_fn(_flip_image(x, spatial_dim)))
            b = _as_float64(flip_latent(base))
            diff = a - b
            norm_b, norm_diff = float(np.linalg.norm(b)), float(np.linalg.norm(diff))
            result[name] = {
                "relative": norm_diff / norm_b if norm_b > 0 else (0.0 if norm_diff == 0 else float("inf")),
                "max_steps": float(np.abs(diff).max()) / unit,
                "rms_steps": float(np.sqrt(np.mean(diff**2))) / unit,
            }
    return result
