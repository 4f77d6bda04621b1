"""Encoding crops with a VAE, and choosing the latent value that goes into the dataset."""

from __future__ import annotations

import gc
import hashlib
import logging
from collections import deque
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
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], channels_last, on ``device``.

    On CUDA the crops go up from pinned memory without blocking the host (the conversion runs on
    the device, ordered after the copy on the current stream).
    """
    import torch

    x = torch.from_numpy(np.array(batch_uint8, dtype=np.uint8, copy=True))
    if device.startswith("cuda"):
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    return _as_model_input(x)


def _as_model_input(x_uint8):
    """uint8 (B, H, W, 3) tensor -> float32 (B, 3, H, W) in [-1, 1], channels_last, same device."""
    import torch

    x = x_uint8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
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
    """What decides the encoder's exact float output, recorded with the latents (see docs/GUARANTEES.md,
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

    This is ``PosteriorEncoder`` fed once: on CUDA the passes are queued ahead of their results
    (see there).
    """
    encoder = PosteriorEncoder(
        vae, device, batch_size, precision, flip, progress, log, total=images.shape[0], image_hw=images.shape[1:3]
    )
    encoder.add(images)
    return encoder.finish()


@dataclass
class _Pass:
    """One forward pass whose results have not been collected yet."""

    start: int  # index of its first image among all images given to the encoder
    host: np.ndarray  # its uint8 crops, kept until collected (a retry after out of memory replays them)
    x: object  # the model input, kept for the fp32 re-encode of non-finite samples (low precision), else None
    mean: object  # results on the host: numpy (CPU) or pinned tensors being filled (CUDA)
    std: object
    ready: object  # CUDA: an event recorded after the copies to the host; None on the CPU


class _CudaCopies:
    """Host <-> device copies that do not stall the GPU.

    Crops are copied into pinned memory and go up on their own stream (``h2d``), so the upload of
    the next pass overlaps the current pass's compute; the compute stream waits for that copy only.
    Results go down into pinned buffers on another stream (``d2h``) after the pass, and the host
    waits for them (an event) only when it collects them. Tensors used across streams are
    recorded on the stream that uses them, so the caching allocator does not reuse their memory
    early; pinned blocks are kept by the host allocator until the copies that used them finish.
    """

    def __init__(self, device: str):
        import torch

        self.device = torch.device(device)
        self.h2d = torch.cuda.Stream(device=self.device)
        self.d2h = torch.cuda.Stream(device=self.device)

    def upload(self, batch_uint8: np.ndarray):
        """(pinned uint8 host copy as numpy, float model input on the device, on the compute stream)."""
        import torch

        host = torch.empty(batch_uint8.shape, dtype=torch.uint8, pin_memory=True)
        host.numpy()[...] = batch_uint8
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.h2d):
            x8 = host.to(self.device, non_blocking=True)
        compute.wait_stream(self.h2d)
        x8.record_stream(compute)
        return host.numpy(), _as_model_input(x8)

    def download(self, mean, std):
        """Start copying ``mean`` and ``std`` (device tensors or None) to pinned host tensors:
        (host mean, host std or None, event recorded after the copies)."""
        import torch

        compute = torch.cuda.current_stream(self.device)
        mean, std = mean.contiguous(), (std.contiguous() if std is not None else None)
        self.d2h.wait_stream(compute)
        out = []
        with torch.cuda.stream(self.d2h):
            for t in (mean, std):
                if t is None:
                    out.append(None)
                    continue
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t.record_stream(self.d2h)
                out.append(host)
            ready = torch.cuda.Event()
            ready.record(self.d2h)
        return out[0], out[1], ready


class PosteriorEncoder:
    """``encode_posterior`` in pieces: the images given to ``add`` over any number of calls are
    encoded exactly as ``encode_posterior`` encodes their concatenation (the same forward passes,
    out-of-memory retries and precision guard), and ``finish`` returns the ``Posterior``.

    Images that do not fill a forward pass wait in a small buffer for the next ``add`` (or
    ``finish``), so how the images are split over calls never changes the passes.

    On the CPU every pass runs when it is full. On CUDA the host only queues work: crops go up
    from pinned memory on a copy stream, results come back into pinned memory on another, and up
    to ``in_flight`` passes (default 2) are queued before the host waits for the oldest one's
    results; so ``add`` returns while the GPU still works, and the caller prepares the next
    crops meanwhile. Low-precision samples are checked for NaN/Inf when their results reach the
    host and re-encoded in fp32 then (from the pass's input, still on the device). Out of memory
    in any step redoes everything not yet collected with fewer images per pass.

    ``total`` (the number of images expected, if known) only goes into messages; ``image_hw``
    gives the latent shape when no image is added; ``low`` shares a low-precision copy of the
    model between encoders (default: made here, as ``encode_posterior`` does).
    """

    def __init__(
        self,
        vae,
        device: str,
        batch_size: int = 16,
        precision: str = "fp32",
        flip: bool = False,
        progress: Callable[[int], None] | None = None,
        log: Callable[[str], None] | None = None,
        *,
        total: int | None = None,
        image_hw: tuple[int, int] | None = None,
        low=None,
        in_flight: int | None = None,
    ):
        self.vae, self.device, self.batch_size, self.flip = vae, device, batch_size, flip
        self.cuda = device.startswith("cuda")
        self.threads_before = None if self.cuda else cpu_threads()
        self.plan = _PassPlan(forward_batch_size(device, batch_size), self.threads_before)
        self.low = low if low is not None else (vae if precision == "fp32" else vae.cast(torch_dtype(precision)))
        self.progress, self.total = progress, total
        self.log = log or logging.getLogger(__name__).warning
        self.depth = (2 if self.cuda else 0) if in_flight is None else max(0, int(in_flight))
        self.copies = _CudaCopies(device) if self.cuda else None
        self.image_hw = tuple(image_hw) if image_hw is not None else None
        self.pending: np.ndarray | None = None  # images waiting for a full pass
        self.fill = 0
        self.inflight: deque[_Pass] = deque()
        self.launched = 0  # images queued (index of the next pass's first image)
        self.collected = 0  # images whose results are on the host
        self.means: list[np.ndarray] = []
        self.stds: list[np.ndarray] = []
        self.redone, self.retries, self.notes = 0, 0, []
        self.sizes, self.threads_used = [self.plan.images], [self.plan.threads]

    @property
    def pass_size(self) -> int:
        """Images per forward pass now (smaller after out-of-memory retries)."""
        return self.plan.images

    def add(self, images: np.ndarray) -> None:
        """Encode ``images`` (uint8 (N, H, W, 3)) after the ones added before (see the class)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 crops (N, H, W, 3), got {images.dtype} {images.shape}")
        if not len(images):
            return
        if self.image_hw is None:
            self.image_hw = tuple(images.shape[1:3])
        if self.pending is None:
            self.pending = np.empty((self.plan.images, *images.shape[1:]), dtype=np.uint8)
        elif images.shape[1:] != self.pending.shape[1:]:
            raise ValueError(f"crops of shape {images.shape[1:]} after crops of shape {self.pending.shape[1:]}")
        pos = 0
        while pos < len(images):
            if not self.fill:
                self._keep(self._passes(images[pos:], final=False))
                return
            take = min(self.plan.images - self.fill, len(images) - pos)
            self.pending[self.fill : self.fill + take] = images[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill >= self.plan.images:
                self._keep(self._passes(self.pending[: self.fill], final=False))

    def finish(self) -> Posterior:
        """Encode the images still waiting, wait for every result, and return them all."""
        self._keep(self._passes(self.pending[: self.fill] if self.fill else None, final=True))
        info = self.vae.info
        h, w = self.image_hw or (0, 0)
        empty = np.empty((0, info.latent_channels, h // info.downsample, w // info.downsample), dtype=np.float32)
        mean = np.concatenate(self.means) if self.means else empty
        std = (np.concatenate(self.stds) if self.stds else empty.copy()) if info.has_posterior else None
        self.means, self.stds = [], []
        return Posterior(
            mean, std, self.redone, self.retries, tuple(self.sizes), tuple(self.threads_used), list(self.notes)
        )

    def _keep(self, leftover: np.ndarray | None) -> None:
        """Make ``leftover`` (fewer images than a pass) the images waiting for the next pass."""
        self.fill = 0 if leftover is None else len(leftover)
        if self.fill:
            self.pending[: self.fill] = leftover.copy()  # it may be a view of ``pending`` itself

    def _passes(self, batch: np.ndarray | None, final: bool) -> np.ndarray | None:
        """Queue full passes over ``batch`` (and, when ``final``, the short last one, then wait for
        every result), retrying with fewer images per pass on out of memory; returns the images
        not queued (fewer than a pass)."""
        import torch

        batch = batch if batch is not None else np.empty((0, 0, 0, 3), dtype=np.uint8)
        pos = 0
        try:
            self._use_threads(self.plan.threads)
            with torch.inference_mode():
                while True:
                    remaining = len(batch) - pos
                    launch = remaining >= self.plan.images or (final and remaining > 0)
                    if not launch and not (final and self.inflight):
                        break
                    where = "launch"
                    try:
                        if launch:
                            stop = min(len(batch), pos + self.plan.images)
                            failing = (self.launched, stop - pos)
                            self._launch(batch[pos:stop])
                            pos = stop
                        where = "collect"
                        while len(self.inflight) > (self.depth if launch else 0):
                            failing = (self.inflight[0].start, len(self.inflight[0].host))
                            self._collect_one()
                        continue
                    except Exception as exc:
                        if not is_out_of_memory(exc):
                            raise
                        error = exc
                    if where == "launch" and self.inflight:
                        # the passes queued before this one ran: keep their results if they can be had
                        try:
                            while self.inflight:
                                failing = (self.inflight[0].start, len(self.inflight[0].host))
                                self._collect_one()
                            failing = (self.launched, min(len(batch), pos + self.plan.images) - pos)
                        except Exception as exc:
                            if not is_out_of_memory(exc):
                                raise
                            error = exc
                    # everything not collected is encoded again with fewer images per pass
                    batch = self._rewind(batch[pos:], failing, error)
                    pos = 0
            return batch[pos:] if pos < len(batch) else None
        finally:
            self._use_threads(self.threads_before)

    def _rewind(self, rest: np.ndarray, failing: tuple[int, int], error: BaseException) -> np.ndarray:
        """After out of memory in the pass of ``failing`` (first image, images): drop the passes not
        collected, lower the images per pass (or raise ``EncodeOutOfMemory``) and return the
        images to encode again, in order: those of the dropped passes, then ``rest``."""
        import torch

        failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if self.cuda and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)  # the dropped passes' work is done before their memory goes
        replay = [p.host for p in self.inflight] + [rest]
        self.inflight.clear()
        self.launched = self.collected
        plan, device, n = self.plan, self.device, self._of_total()
        start, size = failing
        # halve what this pass really held (a last, short pass needs no 16 -> 8 first)
        held = -(-size // (plan.threads or 1)) * (plan.threads or 1)
        smaller = _PassPlan(min(plan.images, held), plan.threads).smaller()
        if smaller is None:
            raise EncodeOutOfMemory(
                f"Out of memory encoding images {start}-{start + size - 1}{n} on {device} with "
                f"{plan.describe()} (IMAGENET_INT8_BATCH_SIZE={self.batch_size}; started with "
                f"{self.sizes[0]} per pass, {self.retries} retries with fewer images): {failure}. "
                f"One image does not fit: {OOM_ADVICE}."
            ) from error
        # the traceback holds the failed pass's frames and tensors: drop it so their memory goes
        error.__traceback__ = None
        error.__context__ = None
        del error
        free_memory(device)
        note = (
            f"Out of memory encoding images {start}-{start + size - 1}{n} on {device} with {plan.describe()} "
            f"({failure}); retrying them with {smaller.describe()}"
            + (" (same bytes on the CPU)" if not self.cuda else " (on a GPU the batch size can change the last bits)")
            + f". Lower IMAGENET_INT8_BATCH_SIZE (now {self.batch_size}) to avoid the retries."
        )
        self.log(note)
        self.notes.append(note)
        self.retries += 1
        self.plan = smaller
        self._use_threads(smaller.threads)
        self.sizes.append(smaller.images)
        self.threads_used.append(smaller.threads)
        replay = [r for r in replay if len(r)]
        if not replay:
            return np.empty((0, 0, 0, 3), dtype=np.uint8)
        return replay[0] if len(replay) == 1 else np.concatenate(replay)

    def _of_total(self) -> str:
        return f" of {self.total}" if self.total is not None else ""

    def _use_threads(self, threads: int | None) -> None:
        import torch

        if threads is not None and cpu_threads() != threads:
            torch.set_num_threads(threads)

    def _launch(self, batch: np.ndarray) -> None:
        """Queue one forward pass (on the CPU: run it)."""
        if self.cuda:
            host, x = self.copies.upload(batch)
        else:
            # kept past this call only when passes wait to be collected: then a copy, since
            # ``batch`` may be the buffer of waiting images, which the next images overwrite
            host, x = (batch.copy() if self.depth else batch), to_model_input(batch, self.device)
        if self.flip:
            x = x.flip(-1)
        m, s = _encode(self.low, x, self.plan.threads or 1)
        keep = x if self.low is not self.vae else None
        if self.cuda:
            m, s, ready = self.copies.download(m, s)
        else:
            m, s, ready = m.numpy(), (s.numpy() if s is not None else None), None
        self.inflight.append(_Pass(self.launched, host, keep, m, s, ready))
        self.launched += len(batch)

    def _collect_one(self) -> None:
        """Wait for the oldest pass's results, redo its non-finite samples in fp32, store them."""
        import torch

        p = self.inflight[0]
        if p.ready is not None:
            p.ready.synchronize()
        mean = np.array(p.mean.numpy() if isinstance(p.mean, torch.Tensor) else p.mean, copy=True)
        std = None
        if p.std is not None:
            std = np.array(p.std.numpy() if isinstance(p.std, torch.Tensor) else p.std, copy=True)
        redone = 0
        if p.x is not None:  # low precision: NaN/Inf samples are encoded again in fp32
            bad = ~np.isfinite(mean).reshape(len(mean), -1).all(1)
            if std is not None:
                bad |= ~np.isfinite(std).reshape(len(std), -1).all(1)
            if bad.any():
                m32, s32 = _encode(self.vae, p.x[torch.from_numpy(bad).to(p.x.device)], self.plan.threads or 1)
                mean[bad] = m32.cpu().numpy()
                if std is not None:
                    std[bad] = s32.cpu().numpy()
                redone = int(bad.sum())
        self.inflight.popleft()
        self.means.append(mean)
        if std is not None:
            self.stds.append(std)
        self.redone += redone
        self.collected += len(mean)
        if self.progress is not None:
            self.progress(self.collected)


def _encode(vae, x, pad: int = 1):
    """(mean, std) as float32 tensors, computing in the model's dtype on ``x`` padded to a
    multiple of ``pad`` images (the padding's outputs are dropped)."""
    n = x.shape[0]
    mean, std = vae.encode(_padded(x, pad).to(vae.dtype))
    return mean[:n].float(), (std[:n].float() if std is not None else None)


def precision_error(vae, images: np.ndarray, device: str, precision: str, value_range: float) -> dict:
    """The latent mean in ``precision`` against fp32 on the same crops, in quantization steps."""
    from imagenet_int8_assets.core.latents.quantize import step

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
