"""Encoding crops with a VAE, and choosing the latent value that goes into the dataset."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

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
    mean: np.ndarray, std: np.ndarray, ids: list[str], value: str, run_seed: int
) -> np.ndarray:
    """The stored latent: ``mean``, or ``mean + std * eps`` with eps seeded per image."""
    if value == "mean":
        return mean.astype(np.float32, copy=True)
    if value != "sample":
        raise ValueError(
            f"Unknown latent value {value!r}: set IMAGENET_INT8_LATENT_VALUE to one of "
            + ", ".join(LATENT_VALUES)
        )
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


def encode_posterior(
    model,
    images: np.ndarray,
    device: str,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode uint8 (N, H, W, 3) crops; returns the posterior (mean, std) as float32 arrays.

    ``progress`` is called with the number of images finished after every batch.
    """
    import torch

    n = images.shape[0]
    channels = int(model.config.latent_channels)
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    h, w = images.shape[1] // factor, images.shape[2] // factor
    mean = np.empty((n, channels, h, w), dtype=np.float32)
    std = np.empty((n, channels, h, w), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            x = to_model_input(images[start:stop], device)
            dist = model.encode(x).latent_dist
            mean[start:stop] = dist.mean.float().cpu().numpy()
            std[start:stop] = dist.std.float().cpu().numpy()
            if progress is not None:
                progress(stop)
    return mean, std


def non_finite_count(*arrays: np.ndarray) -> int:
    """How many values across ``arrays`` are NaN or infinite."""
    return int(sum(np.size(a) - np.count_nonzero(np.isfinite(a)) for a in arrays))
