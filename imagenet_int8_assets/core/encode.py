"""Encoding crops with a VAE, and choosing the latent value that goes into the dataset."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LATENT_VALUES = ("sample", "mean")


def image_seed(run_seed: int, image_id: str) -> int:
    """A 63-bit seed from the run seed and the image's id (stable across machines and runs)."""
    digest = hashlib.blake2b(f"{run_seed}\x00{image_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def standard_normal(image_id: str, run_seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The per-image noise used by ``sample``: drawn on the CPU so every device gives the same bytes."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(image_seed(run_seed, image_id))
    return torch.randn(shape, generator=gen, dtype=torch.float32).numpy()


def select_latent(
    mean: np.ndarray, std: np.ndarray | None, ids: list[str], value: str, run_seed: int
) -> np.ndarray:
    """The stored latent: ``mean``, or ``mean + std * eps`` with eps seeded per image.

    A VAE without a posterior (``std`` None, e.g. AuraEquiVAE) always stores its latent as is.
    """
    if value not in LATENT_VALUES:
        raise ValueError(
            f"Unknown latent value {value!r}: set IMAGENET_INT8_LATENT_VALUE to one of "
            + ", ".join(LATENT_VALUES)
        )
    if value == "mean" or std is None:
        return mean.astype(np.float32, copy=True)
    out = np.empty_like(mean, dtype=np.float32)
    for i, image_id in enumerate(ids):
        out[i] = mean[i] + std[i] * standard_normal(image_id, run_seed, mean.shape[1:])
    return out


def to_model_input(batch_uint8: np.ndarray, device: str):
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], channels_last, on ``device``."""
    import torch

    x = torch.from_numpy(np.array(batch_uint8, dtype=np.uint8, copy=True)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)


PRECISIONS = ("fp32", "bf16", "fp16")


def torch_dtype(precision: str):
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"Unknown precision {precision!r}: set IMAGENET_INT8_PRECISION to one of {', '.join(PRECISIONS)}")
    return table[precision]


@dataclass
class Posterior:
    """Encoder output for N images: float32 mean (N, C, h, w), std (or None: no posterior)."""

    mean: np.ndarray
    std: np.ndarray | None
    reencoded_fp32: int = 0  # samples that were NaN/Inf in low precision and redone in fp32


def encode_posterior(
    vae,
    images: np.ndarray,
    device: str,
    batch_size: int = 16,
    precision: str = "fp32",
    flip: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Posterior:
    """Encode uint8 (N, H, W, 3) crops with a ``LoadedVae`` that sits on ``device`` in fp32.

    ``precision`` bf16/fp16 runs a cast copy of the model; any sample whose output is NaN or
    infinite (the SDXL VAE overflows in fp16) is re-encoded in fp32, so no non-finite value
    leaves this function for a finite input. ``flip`` encodes the horizontally flipped crops.
    ``progress`` is called with the number of images finished after every batch.
    """
    import torch

    low = vae if precision == "fp32" else vae.cast(torch_dtype(precision))
    n = images.shape[0]
    factor = vae.info.downsample
    shape = (n, vae.info.latent_channels, images.shape[1] // factor, images.shape[2] // factor)
    mean = np.empty(shape, dtype=np.float32)
    std = np.empty(shape, dtype=np.float32) if vae.info.has_posterior else None
    redone = 0
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            x = to_model_input(images[start:stop], device)
            if flip:
                x = x.flip(-1)
            m, s = _encode(low, x)
            if low is not vae:
                bad = ~torch.isfinite(m).flatten(1).all(1)
                if s is not None:
                    bad |= ~torch.isfinite(s).flatten(1).all(1)
                if bad.any():
                    m32, s32 = _encode(vae, x[bad])
                    m[bad] = m32
                    if s is not None:
                        s[bad] = s32
                    redone += int(bad.sum())
            mean[start:stop] = m.cpu().numpy()
            if std is not None:
                std[start:stop] = s.cpu().numpy()
            if progress is not None:
                progress(stop)
    return Posterior(mean, std, redone)


def _encode(vae, x):
    """(mean, std) as float32 tensors, computing in the model's dtype."""
    mean, std = vae.encode(x.to(vae.dtype))
    return mean.float(), (std.float() if std is not None else None)


def precision_error(vae, images: np.ndarray, device: str, precision: str, value_range: float) -> dict:
    """The latent mean in ``precision`` against fp32 on the same crops, in quantization steps."""
    from imagenet_int8_assets.core.quantize import step

    reference = encode_posterior(vae, images, device, precision="fp32").mean
    low = encode_posterior(vae, images, device, precision=precision)
    diff = np.abs(low.mean.astype(np.float64) - reference)
    unit = step(value_range)
    return {
        "precision": precision,
        "images": int(images.shape[0]),
        "max_steps": float(diff.max() / unit) if diff.size else 0.0,
        "rms_steps": float(np.sqrt(np.mean(diff**2)) / unit) if diff.size else 0.0,
        "reencoded_fp32": low.reencoded_fp32,
    }


def non_finite_count(*arrays: np.ndarray) -> int:
    """How many values across ``arrays`` are NaN or infinite."""
    return int(sum(np.size(a) - np.count_nonzero(np.isfinite(a)) for a in arrays))
