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


def cpu_threads() -> int:
    """torch's intra-op thread count (the CPU kernels split a batch over these threads)."""
    import torch

    return int(torch.get_num_threads())


def forward_batch_size(device: str, batch_size: int) -> int:
    """Images per forward pass. GPU: ``batch_size``. CPU: a multiple of the thread count.

    On the CPU, a batch that does not divide evenly over torch's threads has its remainder images
    split across threads, which sums in another order: their float latents differ by about 1e-4
    from the same image encoded in a batch that divides evenly (a uint8 code changes about once in
    30,000). With every forward pass a multiple of the thread count (the last one padded), each
    image is computed whole by one thread, so its bytes do not depend on the batch size, its
    position in the batch, the other images, the class's size or order, or the thread count.
    """
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be >= 1: set IMAGENET_INT8_BATCH_SIZE to a positive integer")
    if device.startswith("cuda"):
        return batch_size
    threads = cpu_threads()
    return max(threads, batch_size - batch_size % threads)


def encode_record(device: str, batch_size: int) -> dict:
    """What decides the encoder's exact float output, recorded with the latents (see README,
    "Reproducibility"): device type, configured and per-pass batch size, CPU threads, torch."""
    import torch

    cpu = not device.startswith("cuda")
    return {
        "device_type": "cpu" if cpu else "cuda",
        "batch_size": int(batch_size),
        "forward_batch_size": forward_batch_size(device, batch_size),
        "cpu_threads": cpu_threads() if cpu else None,
        "torch": torch.__version__,
    }


def _padded(x, multiple: int):
    """``x`` with blank images appended so its length is a multiple of ``multiple``."""
    import torch

    short = -x.shape[0] % multiple
    if not short:
        return x
    return torch.cat([x, x.new_zeros((short, *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)


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
    ``progress`` is called with the number of images finished after every batch. On the CPU the
    forward passes hold a multiple of the thread count (``forward_batch_size``; the last one and
    fp32 re-encodes padded with blank images), so each image's result is independent of the batch.
    """
    import torch

    batch_size = forward_batch_size(device, batch_size)
    pad = 1 if device.startswith("cuda") else cpu_threads()
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
            m, s = _encode(low, x, pad)
            if low is not vae:
                bad = ~torch.isfinite(m).flatten(1).all(1)
                if s is not None:
                    bad |= ~torch.isfinite(s).flatten(1).all(1)
                if bad.any():
                    m32, s32 = _encode(vae, x[bad], pad)
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


def _encode(vae, x, pad: int = 1):
    """(mean, std) as float32 tensors, computing in the model's dtype on ``x`` padded to a
    multiple of ``pad`` images (the padding's outputs are dropped)."""
    n = x.shape[0]
    mean, std = vae.encode(_padded(x, pad).to(vae.dtype))
    return mean[:n].float(), (std[:n].float() if std is not None else None)


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
