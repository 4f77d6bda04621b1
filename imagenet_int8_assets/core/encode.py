"""Encoding crops with a VAE, and choosing the latent value that goes into the dataset."""

from __future__ import annotations

import gc
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

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


def encode_record(device: str, batch_size: int, *posteriors: Posterior) -> dict:
    """What decides the encoder's exact float output, recorded with the latents (see README,
    "Reproducibility"): device type, configured and per-pass batch size, CPU threads, torch.

    ``posteriors`` (the ``encode_posterior`` results the record is for) add what out-of-memory
    retries changed, only when there were any: ``oom_retries`` (how many), ``forward_batch_sizes``
    (every number of images per pass that ran, largest first; ``forward_batch_size`` stays the
    planned one) and, on the CPU when the thread count was lowered, ``cpu_threads_used``.
    """
    import torch

    cpu = not device.startswith("cuda")
    record = {
        "device_type": "cpu" if cpu else "cuda",
        "batch_size": int(batch_size),
        "forward_batch_size": forward_batch_size(device, batch_size),
        "cpu_threads": cpu_threads() if cpu else None,
        "torch": torch.__version__,
    }
    retried = [p for p in posteriors if p is not None and p.oom_retries]
    if retried:
        record["oom_retries"] = sum(p.oom_retries for p in retried)
        sizes = {record["forward_batch_size"]}.union(*(p.forward_batch_sizes for p in retried))
        record["forward_batch_sizes"] = sorted(sizes, reverse=True)
        threads = {t for p in retried for t in p.cpu_threads_used if t is not None}
        if cpu and threads - {record["cpu_threads"]}:
            record["cpu_threads_used"] = sorted(threads | {record["cpu_threads"]}, reverse=True)
    return record


def _padded(x, multiple: int):
    """``x`` with blank images appended so its length is a multiple of ``multiple``."""
    import torch

    short = -x.shape[0] % multiple
    if not short:
        return x
    return torch.cat([x, x.new_zeros((short, *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)


@dataclass
class Posterior:
    """Encoder output for N images: float32 mean (N, C, h, w), std (or None: no posterior).

    ``oom_retries``: forward passes that ran out of memory and were redone with fewer images
    (see ``encode_posterior``). ``forward_batch_sizes``: the images per pass that ran, in order
    (the planned size first; one more entry per lowering). ``final_batch_size``: images per pass
    at the end. ``cpu_threads_used``: on the CPU, torch's thread counts that ran, in order (a
    retry below one image per thread also lowers the threads); on a GPU ``(None,)``.
    """

    mean: np.ndarray
    std: np.ndarray | None
    reencoded_fp32: int = 0  # samples that were NaN/Inf in low precision and redone in fp32
    oom_retries: int = 0
    forward_batch_sizes: tuple[int, ...] = ()
    cpu_threads_used: tuple[int | None, ...] = ()
    notes: list[str] = field(default_factory=list)  # one line per out-of-memory retry

    @property
    def final_batch_size(self) -> int:
        return self.forward_batch_sizes[-1] if self.forward_batch_sizes else 0

    def oom_report(self) -> dict:
        """The retries as metadata: empty when there were none."""
        if not self.oom_retries:
            return {}
        return {
            "oom_retries": self.oom_retries,
            "forward_batch_sizes": list(self.forward_batch_sizes),
            "final_batch_size": self.final_batch_size,
            "cpu_threads_used": list(self.cpu_threads_used),
            "notes": list(self.notes),
        }


class EncodeOutOfMemory(RuntimeError):
    """Encoding ran out of memory even with one image per forward pass."""


OOM_ADVICE = (
    "lower IMAGENET_INT8_BATCH_SIZE, use another device (IMAGENET_INT8_DEVICE), a smaller "
    "IMAGENET_INT8_CROP_SIZE, or free the memory other processes hold"
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device (or the host) ran out of memory.

    torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class), a RuntimeError
    saying "out of memory" (other backends, MPS) or "can't allocate memory" (torch's CPU
    allocator), and Python's MemoryError. Our own ``EncodeOutOfMemory`` is final, not retried.
    """
    import torch

    if isinstance(exc, EncodeOutOfMemory):
        return False
    kinds = tuple(
        k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
        if isinstance(k, type)
    )
    if isinstance(exc, (MemoryError, *kinds)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(device: str) -> None:
    """Give the memory of a failed forward pass back (garbage, the CUDA/MPS caching allocator)."""
    import torch

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.startswith("mps") and hasattr(torch, "mps"):
        torch.mps.empty_cache()


@dataclass(frozen=True)
class _PassPlan:
    """Images per forward pass and, on the CPU, the torch threads they are split over."""

    images: int
    threads: int | None

    def smaller(self) -> _PassPlan | None:
        """Half the images per pass, or None at one image (on one thread).

        On the CPU a pass stays a multiple of the thread count (so every image is computed whole
        by one thread and its bytes do not change): below one image per thread, the threads are
        halved too, down to one image on one thread.
        """
        if self.threads is None:
            return _PassPlan(self.images // 2, None) if self.images > 1 else None
        if self.images > self.threads:
            return _PassPlan(max(self.threads, self.images // 2 // self.threads * self.threads), self.threads)
        if self.threads > 1:
            return _PassPlan(self.threads // 2, self.threads // 2)
        return None

    def describe(self) -> str:
        where = f" on {self.threads} CPU thread(s)" if self.threads is not None else ""
        return f"{self.images} image(s) per forward pass{where}"


def encode_posterior(
    vae,
    images: np.ndarray,
    device: str,
    batch_size: int = 16,
    precision: str = "fp32",
    flip: bool = False,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Posterior:
    """Encode uint8 (N, H, W, 3) crops with a ``LoadedVae`` that sits on ``device`` in fp32.

    ``precision`` bf16/fp16 runs a cast copy of the model; any sample whose output is NaN or
    infinite (the SDXL VAE overflows in fp16) is re-encoded in fp32, so no non-finite value
    leaves this function for a finite input. ``flip`` encodes the horizontally flipped crops.
    ``progress`` is called with the number of images finished after every batch. On the CPU the
    forward passes hold a multiple of the thread count (``forward_batch_size``; the last one and
    fp32 re-encodes padded with blank images), so each image's result is independent of the batch.

    Out of memory (see ``is_out_of_memory``) in a forward pass: the memory is freed, the images
    per pass are halved and the failed images are encoded again, and later passes keep the
    smaller size. On the CPU passes stay a multiple of the thread count (below one image per
    thread the threads are halved too, and restored at the end), so the bytes are the same as
    without the retry. One image per pass (on one thread) that still runs out of memory raises
    ``EncodeOutOfMemory`` saying what to change. Each retry is reported to ``log`` (default: this
    module's logger, as a warning) and counted in the result (``oom_retries``,
    ``forward_batch_sizes``, ``cpu_threads_used``, ``notes``).
    """
    import torch

    cuda = device.startswith("cuda")
    threads_before = None if cuda else cpu_threads()
    plan = _PassPlan(forward_batch_size(device, batch_size), threads_before)
    log = log or logging.getLogger(__name__).warning
    low = vae if precision == "fp32" else vae.cast(torch_dtype(precision))
    n = images.shape[0]
    factor = vae.info.downsample
    shape = (n, vae.info.latent_channels, images.shape[1] // factor, images.shape[2] // factor)
    mean = np.empty(shape, dtype=np.float32)
    std = np.empty(shape, dtype=np.float32) if vae.info.has_posterior else None
    redone, retries, sizes, threads_used, notes = 0, 0, [plan.images], [plan.threads], []
    start = 0
    try:
        with torch.inference_mode():
            while start < n:
                stop = min(n, start + plan.images)
                failure = None
                try:
                    m, s, bad = _encode_pass(vae, low, images[start:stop], device, flip, plan.threads or 1)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                    # halve what this pass really held (a last, short pass needs no 16 -> 8 first)
                    held = -(-(stop - start) // (plan.threads or 1)) * (plan.threads or 1)
                    smaller = _PassPlan(min(plan.images, held), plan.threads).smaller()
                    if smaller is None:
                        raise EncodeOutOfMemory(
                            f"Out of memory encoding images {start}-{stop - 1} of {n} on {device} with "
                            f"{plan.describe()} (IMAGENET_INT8_BATCH_SIZE={batch_size}; started with "
                            f"{sizes[0]} per pass, {retries} retries with fewer images): {failure}. "
                            f"One image does not fit: {OOM_ADVICE}."
                        ) from exc
                if failure is None:
                    mean[start:stop] = m
                    if std is not None:
                        std[start:stop] = s
                    redone += bad
                    start = stop
                    if progress is not None:
                        progress(stop)
                    continue
                # Out of the except clause: the failed pass's tensors are garbage now.
                free_memory(device)
                note = (
                    f"Out of memory encoding images {start}-{stop - 1} of {n} on {device} with {plan.describe()} "
                    f"({failure}); retrying them with {smaller.describe()}"
                    + (" (same bytes on the CPU)" if not cuda else " (on a GPU the batch size can change the last bits)")
                    + f". Lower IMAGENET_INT8_BATCH_SIZE (now {batch_size}) to avoid the retries."
                )
                log(note)
                notes.append(note)
                retries += 1
                if smaller.threads is not None and smaller.threads != plan.threads:
                    torch.set_num_threads(smaller.threads)
                plan = smaller
                sizes.append(plan.images)
                threads_used.append(plan.threads)
    finally:
        if threads_before is not None and cpu_threads() != threads_before:
            torch.set_num_threads(threads_before)
    return Posterior(mean, std, redone, retries, tuple(sizes), tuple(threads_used), notes)


def _encode_pass(vae, low, batch_uint8: np.ndarray, device: str, flip: bool, pad: int):
    """One forward pass over ``batch_uint8`` (padded to a multiple of ``pad``) in ``low``'s
    precision, with NaN/Inf samples redone in fp32: (mean, std or None) as numpy, samples redone."""
    import torch

    x = to_model_input(batch_uint8, device)
    if flip:
        x = x.flip(-1)
    m, s = _encode(low, x, pad)
    redone = 0
    if low is not vae:
        bad = ~torch.isfinite(m).flatten(1).all(1)
        if s is not None:
            bad |= ~torch.isfinite(s).flatten(1).all(1)
        if bad.any():
            m32, s32 = _encode(vae, x[bad], pad)
            m[bad] = m32
            if s is not None:
                s[bad] = s32
            redone = int(bad.sum())
    return m.cpu().numpy(), (s.cpu().numpy() if s is not None else None), redone


def _encode(vae, x, pad: int = 1):
    """(mean, std) as float32 tensors, computing in the model's dtype on ``x`` padded to a
    multiple of ``pad`` images (the padding's outputs are dropped)."""
    n = x.shape[0]
    mean, std = vae.encode(_padded(x, pad).to(vae.dtype))
    return mean[:n].float(), (std[:n].float() if std is not None else None)


def precision_error(vae, images: np.ndarray, device: str, precision: str, value_range: float) -> dict:
    """The latent mean in ``precision`` against fp32 on the same crops, in quantization steps."""
    from imagenet_int8_assets.core.quantize import step

    reference = encode_posterior(vae, images, device, precision="fp32")
    low = encode_posterior(vae, images, device, precision=precision)
    diff = np.abs(low.mean.astype(np.float64) - reference.mean)
    unit = step(value_range)
    out = {
        "precision": precision,
        "images": int(images.shape[0]),
        "max_steps": float(diff.max() / unit) if diff.size else 0.0,
        "rms_steps": float(np.sqrt(np.mean(diff**2)) / unit) if diff.size else 0.0,
        "reencoded_fp32": low.reencoded_fp32,
    }
    if reference.oom_retries or low.oom_retries:  # both runs retry on their own (encode_posterior)
        out["oom_retries"] = reference.oom_retries + low.oom_retries
    return out


def non_finite_count(*arrays: np.ndarray) -> int:
    """How many values across ``arrays`` are NaN or infinite."""
    return int(sum(np.size(a) - np.count_nonzero(np.isfinite(a)) for a in arrays))
