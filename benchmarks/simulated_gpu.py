"""A simulated GPU for the pipeline benchmark: the encoder takes a GPU's time, and leaves the CPU idle.

On a GPU node the encode of a run keeps the GPU busy while the CPU cores are mostly free (the crop
workers use some); what the orchestration costs there is the part of its CPU work that does not
overlap with an encode. This machine has no GPU, so ``pipeline.py --simulate-gpu RATE`` makes
every ``LoadedVae.encode`` call of a build last as long as the SDXL encoder would take for a class
of ImageNet's size at RATE images/s: the real (tiny) encode runs, then the call sleeps for the rest
of ``batch x seconds_per_image`` (``time.sleep`` holds neither a core nor the GIL, as a process
waiting on its GPU). Both sides of the benchmark get it: the reference (``install`` in its process)
and the CLI, run as ``python -m benchmarks.simulated_gpu build ...``, which installs it and then is
``imagenet-int8``; the CLI's run processes are spawned, so they import this module again as their
main module and install it too.

The setting travels as ``SECONDS_PER_IMAGE_ENV`` (unset or 0: no simulation).
"""

from __future__ import annotations

import os
import time

SECONDS_PER_IMAGE_ENV = "IMAGENET_INT8_BENCH_GPU_SECONDS_PER_IMAGE"


def seconds_per_image(rate: float, imagenet_images_per_class: float, images_per_class: int) -> float:
    """What one benchmark image must take so that a benchmark class takes as long as an ImageNet
    class at ``rate`` images/s."""
    return imagenet_images_per_class / images_per_class / rate


def install() -> float:
    """Make ``LoadedVae.encode`` last ``batch x seconds`` at least; returns the seconds per image."""
    seconds = float(os.environ.get(SECONDS_PER_IMAGE_ENV) or 0)
    if seconds <= 0:
        return 0.0
    from imagenet_int8_assets.core.latents.vae import LoadedVae

    real = LoadedVae.encode
    if getattr(real, "simulated_gpu", False):
        return seconds

    def encode(self, x):
        started = time.monotonic()
        out = real(self, x)
        rest = x.shape[0] * seconds - (time.monotonic() - started)
        if rest > 0:
            time.sleep(rest)
        return out

    encode.simulated_gpu = True
    LoadedVae.encode = encode
    return seconds


install()

if __name__ == "__main__":
    from imagenet_int8_assets.cli import run

    run()
