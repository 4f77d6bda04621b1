"""Training-side helpers for ``LatentArrays``: uint8 codes to float latents on a device, and flips.

``decode_codes`` moves a uint8 batch to the device as bytes (a quarter of the float traffic) and
dequantizes it there through a 256-entry table computed by ``quantize.dequantize``, so the floats
are bit-identical to the numpy decoder on every device (no reciprocal-multiply shortcut).

Flip augmentation (``hflip_latents``, ``batch``) is offered only where it is correct:

- AuraEquiVAE latents (``vae_family == "aura"``): the latent of the flipped image is computed from
  the latent (``aura_latents.hflip_latent``: flip width, negate channels [-4:-2]);
- a dataset built with ``IMAGENET_INT8_STORE_FLIP=true``: the stored ``vae_output_flip``;
- anything else is refused: flipping an SD/SDXL latent is not the latent of the flipped image.

torch is imported when a function is called, not when this module is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from imagenet_int8_assets.core.latents.aura_latents import hflip_latent
from imagenet_int8_assets.core.latents.quantize import DEFAULT_RANGE, dequantize

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from imagenet_int8_assets.core.reading.latent_arrays import LatentArrays

AURA_FAMILY = "aura"
_TABLES: dict[tuple[float, str], Any] = {}


class FlipUnsupported(ValueError):
    """The dataset's latents cannot be flipped correctly (no equivariant VAE, no stored flips)."""


def default_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _table(value_range: float, device: torch.device) -> torch.Tensor:
    import torch

    key = (float(value_range), str(device))
    if key not in _TABLES:
        _TABLES[key] = torch.from_numpy(dequantize(np.arange(256, dtype=np.uint8), value_range)).to(device)
    return _TABLES[key]


def decode_codes(
    codes: Any, value_range: float = DEFAULT_RANGE, device: str | torch.device | None = None
) -> torch.Tensor:
    """uint8 codes (numpy array or tensor, any shape) -> float32 latents on ``device`` (default: the
    GPU when present), ``z = (u / 255 - 0.5) * 2 * value_range``, equal to ``quantize.dequantize``."""
    import torch

    device = torch.device(device) if device is not None else default_device()
    u = torch.as_tensor(np.ascontiguousarray(codes) if isinstance(codes, np.ndarray) else codes)
    if u.dtype != torch.uint8:
        raise TypeError(f"decode_codes needs uint8 codes, got {u.dtype}")
    u = u.to(device, non_blocking=u.device.type == "cpu" and u.is_pinned())
    return _table(value_range, device)[u.int()]


def flip_support(vae_family: str, has_stored_flip: bool, vae_name: str = "") -> str:
    """How a horizontal flip is obtained: ``"stored"`` or ``"equivariant"``; else ``FlipUnsupported``."""
    if has_stored_flip:
        return "stored"
    if vae_family == AURA_FAMILY:
        return "equivariant"
    raise FlipUnsupported(
        f"Flip augmentation is not available for this dataset: its VAE ({vae_name or 'unknown'}, family "
        f"{vae_family!r}) is not flip-equivariant (the flipped latent of an SD/SDXL-style VAE is not the latent "
        "of the flipped image), and it stores no flipped latents (no 'vae_output_flip' column). Rebuild it with "
        "IMAGENET_INT8_STORE_FLIP=true, or use the AuraEquiVAE (IMAGENET_INT8_VAE=fal/AuraEquiVAE), whose "
        "latents flip exactly."
    )


def hflip_latents(
    z: torch.Tensor, flip: torch.Tensor, *, vae_family: str, z_flip: torch.Tensor | None = None, vae_name: str = ""
) -> torch.Tensor:
    """``z`` (B, C, H, W) with the rows where ``flip`` (bool, (B,)) is True replaced by the latent
    of the horizontally flipped image: the stored ``z_flip`` when given, else the AuraEquiVAE
    latent flip; refuses (``FlipUnsupported``) any other latent."""
    import torch

    how = flip_support(vae_family, z_flip is not None, vae_name)
    flipped = z_flip if how == "stored" else hflip_latent(z)
    mask = flip.to(z.device, torch.bool).reshape(-1, *([1] * (z.ndim - 1)))
    return torch.where(mask, flipped, z)


def batch(
    arrays: LatentArrays,
    index: Any,
    *,
    device: str | torch.device | None = None,
    hflip: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``index`` of ``arrays`` as ``(latents float32 (B, C, H, W), labels int64 (B,))`` on
    ``device``; with ``hflip`` > 0 each row is flipped with that probability (drawn with
    ``generator`` on the CPU), where the dataset supports it (see ``flip_support``)."""
    import torch

    device = torch.device(device) if device is not None else default_device()
    z = decode_codes(arrays.codes[index], arrays.value_range, device)
    labels = torch.as_tensor(np.asarray(arrays.labels[index])).to(device)
    if hflip > 0:
        how = flip_support(arrays.vae_family, arrays.codes_flip is not None, arrays.vae_name)
        flip = torch.rand(z.shape[0], generator=generator) < hflip
        z_flip = decode_codes(arrays.codes_flip[index], arrays.value_range, device) if how == "stored" else None
        z = hflip_latents(z, flip, vae_family=arrays.vae_family, z_flip=z_flip, vae_name=arrays.vae_name)
    return z, labels


__all__ = ["FlipUnsupported", "batch", "decode_codes", "default_device", "flip_support", "hflip_latents"]
