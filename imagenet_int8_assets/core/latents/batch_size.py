"""The encoder's profile on a device: the largest batch that safely fits, and its FLOPs per image.

**Batch size** (``auto_batch_size``). On a CUDA device, forward passes of 1, 2, 4, ... synthetic
crops (up to ``2 * cap``) run through the real encode path (``encode.encode_posterior``: the
low-precision copy next to the fp32 model, the input conversion, the fp32 re-encode of overflows)
until one runs out of memory. The batch used is **half** the largest that fit, at most ``cap``:

- the probe sees one pass in a fresh allocator; a long run also holds what the probe does not:
  the caching allocator's fragmentation after thousands of passes with a short last batch, the
  fp32 re-encode of many overflowing samples at once (fp16), the numerics report's extra cast
  copies, and whatever another process starts on the same GPU. Powers of two put the true limit
  anywhere in [L, 2L), so L itself may be within a few percent of it; L/2 leaves at least half
  the activation memory free;
- it costs almost no speed: a conv encoder saturates a GPU long before the memory is full
  (at 256x256 the SDXL encoder does 272.7 GFLOPs per image; 64 images are already 17 TFLOP per
  pass), so L/2 against L changes images/s by little, and an out-of-memory retry halfway
  through a class (``encode_posterior`` halves and redoes the pass) costs more than it saves;
- ``cap`` (256) bounds the pass where extra images only add latency and host memory.

The result is cached per (GPU name, total memory, VAE identity, precision, crop size, torch
version, cap) in ``<output>/.devices/encoder_profile.json``, so later runs skip the search (delete
the file to search again, e.g. after freeing memory that other processes held during the probe).
On the CPU the probe is skipped and today's rule stays: 16 images, which ``forward_batch_size``
rounds to a multiple of torch's thread count (bytes independent of the batch).

The probe is a plain callable ``try_batch(n) -> bool`` (True: n images fit), so tests inject a
fake limit (``lambda n: n <= 24``) instead of patching torch; ``forward_probe`` builds the real one.

**FLOPs** (``encoder_flops``). ``torch.utils.flop_counter.FlopCounterMode`` around a one-image
``encode`` of a copy of the model on the meta device: shapes only, no arithmetic, so the full
SDXL encoder is counted in well under a second on any machine, and the count does not depend on
the device's kernels. FlopCounterMode counts matrix multiplications, convolutions and attention
(``scaled_dot_product_attention`` through its math path on meta: QK^T and AV), a multiply-add as
2 FLOPs; normalizations, activations, additions and the posterior's exp are not counted (they are
well under 1% for these encoders). On a real CPU forward the fused CPU attention kernel has no
formula and counts 0 (2.1 of 272.7 GFLOPs for SDXL), one reason to count on meta. Cached in the
same file per (VAE identity, crop size, torch version). ``tflops(images_per_second, flops)``
turns a measured throughput into achieved TFLOP/s.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imagenet_int8_assets.core.common.build_lock import hold_init_lock
from imagenet_int8_assets.core.latents.devices import devices_dir, torch_device
from imagenet_int8_assets.core.latents.encode import (
    OOM_ADVICE,
    EncodeOutOfMemory,
    encode_posterior,
    free_memory,
    is_out_of_memory,
)
from imagenet_int8_assets.core.common.files import atomic_write_json

AUTO = "auto"
DEFAULT_CAP = 256
CPU_BATCH_SIZE = 16  # today's default; forward_batch_size rounds it to a multiple of the threads
HEADROOM_DIVISOR = 2  # use 1/2 of the largest batch that fit (module docstring)
PROFILE_FILE = "encoder_profile.json"
RULE = "pow2-half-v1"  # part of the cache key: a new rule searches again


class BatchSizeProbeError(RuntimeError):
    """Not even one image fits on the device."""


def profile_path(output: str | os.PathLike) -> Path:
    return devices_dir(output) / PROFILE_FILE


def parse_batch_size(value: str | int) -> int | str:
    """A setting value: ``"auto"`` or a positive integer (the same refusal as a bad number)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ValueError(f"IMAGENET_INT8_BATCH_SIZE={value!r}: use a positive integer or 'auto'")
    return number


# ---------------------------------------------------------------------------------- the search


def largest_fitting_batch(try_batch: Callable[[int], bool], limit: int) -> tuple[int, dict[int, bool]]:
    """The largest power of two <= ``limit`` for which ``try_batch`` is True, trying 1, 2, 4, ...
    and stopping at the first False; 0 when even 1 fails. Also returns every answer, in order."""
    tried: dict[int, bool] = {}
    best, n = 0, 1
    while n <= limit:
        tried[n] = bool(try_batch(n))
        if not tried[n]:
            break
        best, n = n, n * 2
    return best, tried


def with_headroom(largest: int, cap: int = DEFAULT_CAP) -> int:
    """The batch to use when ``largest`` images fit: half of it, at most ``cap``, at least 1."""
    return max(1, min(cap, largest // HEADROOM_DIVISOR))


def forward_probe(vae, device: str, precision: str, crop_size: int) -> Callable[[int], bool]:
    """``try_batch(n)``: whether one pass of ``n`` synthetic ``crop_size`` crops fits on ``device``,
    through ``encode_posterior`` with ``precision`` (a pass that ran out of memory is one that
    ``encode_posterior`` had to retry smaller). The allocator's cache is emptied after every try,
    so each starts as a run does; after an out-of-memory exception the garbage is collected first
    (a full ``gc.collect`` takes about a second in a process that has imported Dagster: only then)."""
    where = torch_device(device)

    def try_batch(n: int) -> bool:
        images = np.random.default_rng(n).integers(0, 256, (n, crop_size, crop_size, 3), dtype=np.uint8)
        fits, raised = False, False
        try:
            post = encode_posterior(vae, images, where, batch_size=n, precision=precision, log=lambda _: None)
            fits = post.oom_retries == 0  # a retry already collected the failed pass's garbage
        except EncodeOutOfMemory:
            raised = True
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            raised = True
        del images
        if raised:
            free_memory(where)  # the exception's frames held the failed pass's tensors
        else:
            _empty_cache(where)
        return fits

    return try_batch


def _empty_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- identities


def vae_identity(info) -> dict:
    """What makes two loaded VAEs the same for memory and FLOPs (a ``VaeInfo`` or its dict)."""
    d = info if isinstance(info, dict) else info.as_dict()
    return {
        "requested": d.get("requested"),
        "loaded_preset": (d.get("extra") or {}).get("loaded_preset"),
        "source": d.get("source"),
        "family": d.get("family"),
        "weights_sha256": d.get("weights_sha256"),
        "latent_channels": d.get("latent_channels"),
    }


def cuda_identity(device: str) -> dict:
    """The GPU's model name and total memory (bytes): two GPUs alike share a cached batch size."""
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    return {"name": str(props.name), "total_memory": int(props.total_memory)}


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _key(**parts) -> str:
    return json.dumps(parts, sort_keys=True, separators=(",", ":"))


def _read_profile(output) -> dict:
    try:
        data = json.loads(profile_path(output).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(output, section: str, key: str, entry: dict) -> None:
    """Add ``entry`` under ``section``/``key`` (read-modify-write under a lock; atomic replace)."""
    folder = devices_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    with hold_init_lock(folder):
        data = _read_profile(output)
        data.setdefault(section, {})[key] = entry
        atomic_write_json(profile_path(output), data)


# ---------------------------------------------------------------------------------- batch size


@dataclass
class BatchSizeChoice:
    """The forward batch size chosen for a run, and how.

    ``source``: "cpu" (today's rule, no probe), "probe" (searched now) or "cache" (searched by an
    earlier run). ``largest_fit``: the largest batch that fit in the probe; ``tried``: every size
    tried and whether it fit; ``seconds``: the probe's time (0 from the cache).
    """

    batch_size: int
    source: str
    largest_fit: int | None = None
    cap: int | None = None
    gpu: dict | None = None
    tried: dict[int, bool] = field(default_factory=dict)
    seconds: float = 0.0

    def as_metadata(self) -> dict:
        d = asdict(self)
        d["tried"] = {str(k): v for k, v in self.tried.items()}
        return d


def auto_batch_size(
    vae,
    device: str,
    precision: str,
    crop_size: int,
    output: str | os.PathLike,
    cap: int = DEFAULT_CAP,
    try_batch: Callable[[int], bool] | None = None,
    gpu: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> BatchSizeChoice:
    """The batch size for ``IMAGENET_INT8_BATCH_SIZE=auto`` on ``device`` (call it while holding
    the device's lease: the probe must not share the GPU with another encode).

    CPU (or a simulated ``cpu:N``): ``CPU_BATCH_SIZE`` without any probe. CUDA: the cached choice
    for this GPU model and memory, VAE, precision, crop size, torch and cap, else the search
    (``largest_fitting_batch`` with ``try_batch``, default ``forward_probe``) and ``with_headroom``,
    then cached. ``gpu`` overrides ``cuda_identity(device)`` (tests simulate a GPU on the CPU with it
    and a fake ``try_batch``). Raises ``BatchSizeProbeError`` when one image does not fit.
    """
    if not device.startswith("cuda"):
        return BatchSizeChoice(CPU_BATCH_SIZE, "cpu")
    gpu = gpu or cuda_identity(device)
    key = _key(gpu=gpu, vae=vae_identity(vae.info), precision=precision, crop_size=int(crop_size),
               torch=_torch_version(), cap=int(cap), rule=RULE)
    cached = _read_profile(output).get("batch_sizes", {}).get(key)
    if isinstance(cached, dict) and isinstance(cached.get("batch_size"), int) and cached["batch_size"] >= 1:
        return BatchSizeChoice(cached["batch_size"], "cache", cached.get("largest_fit"), cap, gpu)
    probe = try_batch or forward_probe(vae, device, precision, crop_size)
    started = time.monotonic()
    largest, tried = largest_fitting_batch(probe, HEADROOM_DIVISOR * cap)
    seconds = time.monotonic() - started
    if largest == 0:
        raise BatchSizeProbeError(
            f"One {crop_size}x{crop_size} image does not fit on {device} ({gpu.get('name')}, "
            f"{gpu.get('total_memory', 0) / 2**30:.1f} GiB) with {vae.info.requested!r} in {precision}: {OOM_ADVICE}."
        )
    choice = BatchSizeChoice(with_headroom(largest, cap), "probe", largest, cap, gpu, tried, round(seconds, 3))
    _store(output, "batch_sizes", key, {
        "batch_size": choice.batch_size, "largest_fit": largest, "tried": {str(k): v for k, v in tried.items()},
        "seconds": choice.seconds, "gpu": gpu, "vae": vae_identity(vae.info), "precision": precision,
        "crop_size": int(crop_size), "cap": int(cap),
    })
    if log is not None:
        log(
            f"Batch size auto on {device} ({gpu.get('name')}): {largest} image(s) per pass fit, using "
            f"{choice.batch_size} (half, at most {cap}); searched in {seconds:.1f}s, cached in {profile_path(output)}"
        )
    return choice


def resolve_batch_size(setting, vae, device: str, precision: str, crop_size: int, output, **kwargs) -> BatchSizeChoice:
    """``IMAGENET_INT8_BATCH_SIZE`` as a choice: a number is used as is (source "setting"),
    ``auto`` goes through ``auto_batch_size``."""
    value = parse_batch_size(setting)
    if value == AUTO:
        return auto_batch_size(vae, device, precision, crop_size, output, **kwargs)
    return BatchSizeChoice(int(value), "setting")


# ---------------------------------------------------------------------------------- FLOPs


def _meta_copy(model):
    """``model``'s structure with every parameter and buffer on the meta device (no data copied)."""
    import torch

    memo: dict = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(empty, requires_grad=False) if isinstance(t, torch.nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def count_encoder_flops(vae, crop_size: int) -> int:
    """FLOPs of ``vae.encode`` on one ``crop_size`` image (FlopCounterMode on the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from imagenet_int8_assets.core.latents.vae import LoadedVae

    meta = LoadedVae(_meta_copy(vae.model), vae.info)
    x = torch.empty((1, 3, crop_size, crop_size), device="meta")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        meta.encode(x)
    return int(counter.get_total_flops())


def encoder_flops(vae, crop_size: int, output: str | os.PathLike | None = None) -> int:
    """``count_encoder_flops``, cached under ``output`` per (VAE identity, crop size, torch)."""
    if output is None:
        return count_encoder_flops(vae, crop_size)
    key = _key(vae=vae_identity(vae.info), crop_size=int(crop_size), torch=_torch_version())
    cached = _read_profile(output).get("flops", {}).get(key)
    if isinstance(cached, dict) and isinstance(cached.get("flops_per_image"), int):
        return cached["flops_per_image"]
    flops = count_encoder_flops(vae, crop_size)
    _store(output, "flops", key, {"flops_per_image": flops, "vae": vae_identity(vae.info), "crop_size": int(crop_size)})
    return flops


def tflops(images_per_second: float, flops_per_image: int, passes_per_image: int = 1) -> float:
    """Achieved TFLOP/s: encoder passes per second times FLOPs per pass (``passes_per_image`` 2
    when the flipped crop is encoded too; fp32 re-encodes of overflows are not counted)."""
    return float(images_per_second) * passes_per_image * flops_per_image / 1e12
