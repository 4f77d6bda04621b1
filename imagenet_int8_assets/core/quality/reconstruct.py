"""Decoding latents back to images, and what the latents lost (no Dagster import).

For a seeded sample of images, the reconstruction report compares the original crop with the
decoding of (a) the float latent and (b) the dequantized uint8 code read back from the dataset.
"""

from __future__ import annotations

import numpy as np

from imagenet_int8_assets.core.latents.encode import image_seed
from imagenet_int8_assets.core.quality.metrics import batch_metrics


def choose_samples(count: int, k: int, run_seed: int, key: str) -> np.ndarray:
    """Up to ``k`` sorted indices out of ``count``, seeded by the run seed and ``key`` (the class)."""
    rng = np.random.default_rng(image_seed(run_seed, f"report:{key}"))
    return np.sort(rng.choice(count, size=min(k, count), replace=False)) if count else np.zeros(0, np.int64)


def decode_images(vae, latents: np.ndarray, device: str, batch_size: int = 8) -> np.ndarray:
    """float latents (N, C, h, w) -> uint8 images (N, H, W, 3), in fp32 on ``device``."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, latents.shape[0], batch_size):
            z = torch.from_numpy(np.ascontiguousarray(latents[start : start + batch_size], dtype=np.float32)).to(device)
            y = vae.decode(z).float()
            y = ((y + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
            out.append(y.permute(0, 2, 3, 1).cpu().numpy())
    if not out:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.concatenate(out)


def reconstruction_rows(originals: np.ndarray, from_float: np.ndarray, from_uint8: np.ndarray) -> list[dict]:
    """Per image: PSNR and SSIM of both reconstructions against the original, and the PSNR gap."""
    float_metrics = batch_metrics(originals, from_float)
    uint8_metrics = batch_metrics(originals, from_uint8)
    rows = []
    for f, u in zip(float_metrics, uint8_metrics):
        rows.append(
            {
                "psnr_float": f["psnr"],
                "psnr_uint8": u["psnr"],
                "psnr_gap": f["psnr"] - u["psnr"] if np.isfinite(f["psnr"]) and np.isfinite(u["psnr"]) else 0.0,
                "ssim_float": f["ssim"],
                "ssim_uint8": u["ssim"],
            }
        )
    return rows
