"""Throughput of our crop and encode steps against the plain published way, in one run.

Run from the repository root::

    python -m benchmarks.run                      # defaults: 200 JPEGs, SDXL-size VAE, auto device
    python -m benchmarks.run --json results.json  # also write the results as JSON
    python -m benchmarks.run --vae tiny-random    # fast smoke run (or --skip-encode)

What is measured (img/s; every ratio is ours / reference, so > 1 means ours is faster):

1. Crops. ``imagenet_int8_assets.core.preprocess.crop_file`` with the ``imagenet.int8`` and
   ``adm`` recipes versus ``reference_crop`` below, the published Imagenet.int8 algorithm written
   out plainly. On 1 process (in-process loop) and on ``--workers`` processes (default: all cores):
   ours through ``core.common.parallel.map_ordered`` with ``crop_task``, the reference through a spawn
   ``ProcessPoolExecutor`` with the same chunk size. A pool run includes starting its pool, as in
   the pipeline. The input is ``--images`` generated JPEGs (quality 90) in ImageNet-like sizes;
   the run also checks that ``imagenet.int8`` and the reference give identical pixels.
2. Encoding. ``core.latents.encode.encode_posterior`` on 256x256 uint8 crops with the model set up as the
   ``vae_latents`` asset does (``channels_last``) versus ``reference_encode`` below, the plain
   ``model.encode(x).latent_dist.sample()`` on a contiguous float32 tensor in [-1, 1]. Both go
   from uint8 crops in host memory to latents in host memory, in fp32, with the same batch size.

Every figure comes from the one timing helper, ``measure``: one untimed warm-up call per
workload, then ``repeats`` timed calls per workload, taken round-robin so that a change of load on
the machine hits all of them alike; the fastest call is reported (all are kept in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.machine import cpu_name, package_version
from imagenet_int8_assets.core.source.images import DEFAULT_MAX_PIXELS
from imagenet_int8_assets.core.common.parallel import MIN_ITEMS_FOR_POOL, default_workers, map_ordered
from imagenet_int8_assets.core.crops.preprocess import DEFAULT_SIZE, crop_file, crop_task, crop_tasks
from imagenet_int8_assets.sample import SAMPLE_CLASSES, synthetic_picture

SIZE = DEFAULT_SIZE
# One cycle of 20 source sizes (width, height), roughly ImageNet's mix: mostly ~500 px photos in
# both orientations, some larger ones, and one large 2000x1500 per cycle.
SIZE_MIX: tuple[tuple[tuple[int, int], int], ...] = (
    ((500, 375), 7),
    ((375, 500), 4),
    ((500, 333), 3),
    ((333, 500), 1),
    ((800, 600), 2),
    ((1024, 768), 2),
    ((2000, 1500), 1),
)
JPEG_QUALITY = 90
CHUNKSIZE = 8  # as the preprocessed_crops asset passes to map_ordered; the reference pool too
CROP_WARMUP_IMAGES = 16


# --------------------------------------------------------------------------------------------
# The references: the published way, written out plainly (module level, so a spawn pool can
# pickle reference_crop).
# --------------------------------------------------------------------------------------------


def reference_crop(path: str, size: int = SIZE) -> np.ndarray:
    """The published Imagenet.int8 crop: BICUBIC short side -> ``size``, float-box centre crop."""
    img = Image.open(path)
    w, h = img.size
    if w < h:
        resized = (size, int(h * size / w))
    else:
        resized = (int(w * size / h), size)
    img = img.resize(resized, Image.BICUBIC)
    w, h = img.size
    img = img.crop(((w - size) / 2, (h - size) / 2, (w + size) / 2, (h + size) / 2))
    return np.asarray(img.convert("RGB"))


def reference_encode(model, images: np.ndarray, device: str, batch_size: int) -> np.ndarray:
    """The plain way: contiguous NCHW float32 in [-1, 1], ``model.encode(x).latent_dist.sample()``."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size])
            x = (batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous().to(device)
            encoded = model.encode(x)  # AutoencoderKL: a posterior; AuraEquiVAE: the latent itself
            out.append((encoded.latent_dist.sample() if hasattr(encoded, "latent_dist") else encoded).cpu())
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds of each timed call over ``items`` items."""

    items: int
    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def per_second(self) -> float:
        return self.items / self.best

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "seconds": [round(s, 4) for s in self.seconds],
            "img_per_s": round(self.per_second, 3),
        }


def measure(
    workloads: dict[str, Callable[[Sequence], Any]], items: Sequence, repeats: int, warmup: Sequence
) -> dict[str, tuple[Timing, Any]]:
    """Time each workload ``fn(items)`` ``repeats`` times, after one untimed ``fn(warmup)`` each.

    The timed calls go round-robin over the workloads, so a load change on the machine hits
    them alike. Returns, per workload, its timing and the result of its last call. A workload
    must finish its work before it returns (results in host memory, so GPU work is complete).
    """
    for fn in workloads.values():
        fn(warmup)
    seconds: dict[str, list[float]] = {name: [] for name in workloads}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in workloads.items():
            start = time.perf_counter()
            results[name] = fn(items)
            seconds[name].append(time.perf_counter() - start)
    return {name: (Timing(len(items), seconds[name]), results[name]) for name in workloads}


def ratio_rows(measured: dict[str, tuple[Timing, Any]], reference: str, **common: Any) -> list[dict[str, Any]]:
    """One result row per workload, with its throughput relative to the ``reference`` workload."""
    reference_rate = measured[reference][0].per_second
    return [
        {
            **common,
            "implementation": name,
            **timing.as_dict(),
            "ratio_vs_reference": round(timing.per_second / reference_rate, 3),
        }
        for name, (timing, _) in measured.items()
    ]


# --------------------------------------------------------------------------------------------
# Input images
# --------------------------------------------------------------------------------------------


def _write_image(task: tuple[str, int, int, int]) -> str:
    path, width, height, seed = task
    colours = list(SAMPLE_CLASSES.values())
    picture = synthetic_picture(width, height, colours[seed % len(colours)], seed)
    picture.save(path, quality=JPEG_QUALITY)
    return path


def write_images(folder: Path, count: int, workers: int) -> list[str]:
    """``count`` synthetic JPEGs in ``folder``, cycling through ``SIZE_MIX``."""
    cycle = [wh for wh, n in SIZE_MIX for _ in range(n)]
    tasks = []
    for i in range(count):
        w, h = cycle[i % len(cycle)]
        tasks.append((str(folder / f"img_{i:05d}_{w}x{h}.JPEG"), w, h, i))
    return list(map_ordered(_write_image, tasks, workers))


# --------------------------------------------------------------------------------------------
# Crops
# --------------------------------------------------------------------------------------------


def crop_ours(paths: Sequence[str], recipe: str, workers: int) -> list[np.ndarray]:
    """Our crop step: ``crop_task`` through ``map_ordered`` (in-process when ``workers`` is 1)."""
    tasks = crop_tasks("", paths, recipe, SIZE, DEFAULT_MAX_PIXELS)  # the paths as they are
    out = []
    for arr, reason in map_ordered(crop_task, tasks, workers, CHUNKSIZE):
        if arr is None:
            raise RuntimeError(f"crop failed: {reason}")
        out.append(arr)
    return out


def crop_reference(paths: Sequence[str], workers: int) -> list[np.ndarray]:
    """``reference_crop`` in a loop, or on a spawn pool of ``workers`` processes."""
    if workers <= 1:
        return [reference_crop(p) for p in paths]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(reference_crop, paths, chunksize=CHUNKSIZE))


def _noop(x: int) -> int:
    return x


def start_pool(tasks: Sequence[int]) -> list[int]:
    """Start a spawn pool of ``len(tasks)`` workers, run no-op tasks, shut it down: the start-up
    cost that every pool row pays once per call."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(tasks), mp_context=ctx) as pool:
        return list(pool.map(_noop, tasks))


def _digests(arrays: Sequence[np.ndarray]) -> list[str]:
    return [hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest() for a in arrays]


def benchmark_crops(paths: list[str], workers: int, repeats: int) -> dict[str, Any]:
    startup = None
    if workers > 1:
        startup = measure({"pool": start_pool}, range(workers), repeats, range(workers))["pool"][0].best
    rows, digests = [], {}
    for processes in sorted({1, workers}):
        workloads = {
            "reference imagenet.int8": lambda ps, n=processes: crop_reference(ps, n),
            "ours imagenet.int8": lambda ps, n=processes: crop_ours(ps, "imagenet.int8", n),
            "ours adm": lambda ps, n=processes: crop_ours(ps, "adm", n),
        }
        # A pool cannot be warmed ahead of a call that starts its own, so pool runs warm up on
        # the whole set (file cache, imports); in-process runs on a few images.
        warmup = paths if processes > 1 else paths[:CROP_WARMUP_IMAGES]
        measured = measure(workloads, paths, repeats, warmup)
        rows += ratio_rows(measured, "reference imagenet.int8", processes=processes)
        digests.update({(name, processes): _digests(arrays) for name, (_, arrays) in measured.items()})
    # Pixel identity: imagenet.int8 (ours) == reference on every image, at every process count,
    # and the pool runs give the same pixels as the in-process runs.
    baseline = digests[("reference imagenet.int8", 1)]
    mismatched = {
        i
        for (name, _), found in digests.items()
        if name != "ours adm"
        for i, (a, b) in enumerate(zip(found, baseline))
        if a != b
    }
    return {
        "images": len(paths),
        "size": SIZE,
        "workers": workers,
        "repeats": repeats,
        "pool_startup_s": None if startup is None else round(startup, 4),
        "rows": rows,
        "pixel_identical": not mismatched,
        "pixel_mismatched_images": sorted(mismatched),
    }


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def benchmark_encode(
    crops: np.ndarray, vae: str, device: str, batch_size: int, repeats: int, precision: str = "fp32"
) -> dict[str, Any]:
    import torch

    from imagenet_int8_assets.core.latents.encode import encode_posterior
    from imagenet_int8_assets.core.latents.devices import resolve_device
    from imagenet_int8_assets.core.latents.vae import LoadedVae, load_vae

    device = resolve_device(device)
    loaded = load_vae(vae)
    info, model = loaded.info, loaded.model
    reference_model = model.to(device)
    # As the vae_latents asset sets it up (channels_last, the configured precision).
    ours = LoadedVae(copy.deepcopy(reference_model), info).to(device)
    workloads = {
        "reference": lambda imgs: reference_encode(reference_model, imgs, device, batch_size),
        "ours": lambda imgs: encode_posterior(ours, imgs, device, batch_size, precision),
    }
    measured = measure(workloads, crops, repeats, crops[:batch_size])
    return {
        "vae": vae,
        "vae_source": info.source,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name(),
        "dtype": "float32 (reference), " + precision + " (ours)",
        "batch_size": batch_size,
        "images": len(crops),
        "warmup_images": min(batch_size, len(crops)),
        "repeats": repeats,
        "rows": ratio_rows(measured, "reference"),
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        "usable_cores": default_workers(),
        "cpu_model": cpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "diffusers": (package_version("diffusers") or "not installed"),
        "pillow": (package_version("pillow") or "not installed"),
        "numpy": np.__version__,
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        f"Machine: {m['cpu_count']} CPUs ({m['usable_cores']} usable), {m['cpu_model']}; "
        f"GPU: {m['gpu'] or 'none'}",
        f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), diffusers "
        f"{m['diffusers']}, Pillow {m['pillow']}, numpy {m['numpy']}",
        f"{m['date']}, load average at start {m['load_average_1m_at_start']}",
    ]
    crops = results.get("crops")
    if crops:
        out += [
            "",
            f"Crop throughput: {crops['images']} JPEGs -> {crops['size']}x{crops['size']}, best of "
            f"{crops['repeats']}"
            + (
                f"; the {crops['workers']}-process rows include starting a spawn pool (measured "
                f"alone: {crops['pool_startup_s']:.2f} s)"
                if crops["pool_startup_s"] is not None
                else ""
            ),
            format_table(
                ("processes", "crop", "img/s", "vs reference"),
                [
                    (r["processes"], r["implementation"], f"{r['img_per_s']:.1f}", f"{r['ratio_vs_reference']:.2f}x")
                    for r in crops["rows"]
                ],
            ),
            "pixel-identical: "
            + ("yes" if crops["pixel_identical"] else f"no ({len(crops['pixel_mismatched_images'])} images differ)")
            + f" (imagenet.int8 vs reference, {crops['images']} images, every process count)",
        ]
    enc = results.get("encode")
    if enc:
        out += [
            "",
            f"Encode throughput: {enc['vae']} ({enc['parameters'] / 1e6:.1f}M parameters) on "
            f"{enc['device']} ({enc['device_name']}), {enc['dtype']}, batch {enc['batch_size']}, "
            f"{enc['images']} images after {enc['warmup_images']} warm-up, best of {enc['repeats']}",
            format_table(
                ("implementation", "img/s", "vs reference"),
                [
                    (ENCODE_LABELS[r["implementation"]], f"{r['img_per_s']:.2f}", f"{r['ratio_vs_reference']:.2f}x")
                    for r in enc["rows"]
                ],
            ),
        ]
    return "\n".join(out)


ENCODE_LABELS = {
    "reference": "reference: encode(x).latent_dist.sample(), contiguous",
    "ours": "ours: encode_posterior, channels_last",
}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200, help="generated JPEGs for the crop benchmark (default 200)")
    p.add_argument("--workers", type=int, default=default_workers(), help="processes for the all-core rows (default: all cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per crop measurement; the best is reported (default 3)")
    p.add_argument("--skip-crop", action="store_true", help="skip the crop benchmark")
    p.add_argument("--vae", default="sdxl-random", help="VAE preset, Hub id or folder (default sdxl-random)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--batch-size", type=int, default=8, help="encode batch size (default 8)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="our encode precision (default fp32)")
    p.add_argument("--encode-images", type=int, default=8, help="timed images per encode pass (default 8)")
    p.add_argument("--encode-repeats", type=int, default=1, help="timed encode passes; the best is reported (default 1)")
    p.add_argument("--skip-encode", action="store_true", help="skip the encode benchmark")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    if not args.skip_crop and args.images < MIN_ITEMS_FOR_POOL:
        p.error(f"--images must be at least {MIN_ITEMS_FOR_POOL}: below that map_ordered does not start a pool")
    for name in ("workers", "repeats", "batch_size", "encode_images", "encode_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.skip_encode:  # fail before the crop part, not after it
        from imagenet_int8_assets.core.latents.devices import DeviceSettingError, resolve_device

        try:
            args.device = resolve_device(args.device)
        except DeviceSettingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    results: dict[str, Any] = {
        "machine": machine_facts(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="imagenet-int8-bench-") as tmp:
        count = args.encode_images if args.skip_crop else args.images
        print(f"Writing {count} JPEGs to {tmp} ...", file=sys.stderr, flush=True)
        paths = write_images(Path(tmp), count, args.workers)
        if not args.skip_crop:
            print("Timing crops ...", file=sys.stderr, flush=True)
            results["crops"] = benchmark_crops(paths, args.workers, args.repeats)
        if not args.skip_encode:
            print(f"Timing encode ({args.vae}) ...", file=sys.stderr, flush=True)
            sources = [crop_file(p) for p in paths[: args.encode_images]]
            crops = np.stack([sources[i % len(sources)] for i in range(args.encode_images)])
            results["encode"] = benchmark_encode(
                crops, args.vae, args.device, args.batch_size, args.encode_repeats, args.precision
            )
    print(report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nResults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
