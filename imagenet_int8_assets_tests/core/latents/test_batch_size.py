"""The largest batch that safely fits (searched once per GPU, VAE, precision and crop size, then
cached) and the encoder's FLOPs per image.

The GPU search runs here on the CPU with an injected probe (``try_batch``: a fake memory limit)
and an injected GPU identity; the real probe runs on the CPU with the tiny VAE and with a VAE that
raises torch's out-of-memory error above a size. No torch function is patched.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from imagenet_int8_assets.core.latents.batch_size import (
    CPU_BATCH_SIZE,
    BatchSizeProbeError,
    _meta_copy,
    auto_batch_size,
    count_encoder_flops,
    encoder_flops,
    forward_probe,
    largest_fitting_batch,
    parse_batch_size,
    profile_path,
    resolve_batch_size,
    tflops,
    with_headroom,
)

H100 = {"name": "Fake H100", "total_memory": 85_000_000_000}


def oom_above(limit: int, calls: list[int] | None = None):
    """A ``try_batch`` for a device where more than ``limit`` images run out of memory."""

    def try_batch(n: int) -> bool:
        if calls is not None:
            calls.append(n)
        return n <= limit

    return try_batch


def never_called(n: int) -> bool:
    raise AssertionError(f"the probe ran ({n} images) but should have been skipped")


def test_the_search_doubles_until_a_batch_does_not_fit():
    calls: list[int] = []
    assert largest_fitting_batch(oom_above(40, calls), 512) == (32, {1: True, 2: True, 4: True, 8: True, 16: True, 32: True, 64: False})
    assert calls == [1, 2, 4, 8, 16, 32, 64]  # stops at the first failure
    assert largest_fitting_batch(oom_above(10**6), 8) == (8, {1: True, 2: True, 4: True, 8: True})
    assert largest_fitting_batch(oom_above(0), 512) == (0, {1: False})
    assert [with_headroom(n) for n in (1, 2, 3, 32, 512, 4096)] == [1, 1, 1, 16, 256, 256]
    assert with_headroom(64, cap=16) == 16


def test_batch_size_setting_values():
    assert parse_batch_size("auto") == "auto" and parse_batch_size(" AUTO ") == "auto"
    assert parse_batch_size("8") == 8 and parse_batch_size(3) == 3
    for bad in ("0", "-2", "many", "", None):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            parse_batch_size(bad)


def test_on_the_cpu_the_probe_is_skipped(tiny_vae, tmp_path):
    for device in ("cpu", "cpu:1"):
        choice = auto_batch_size(tiny_vae, device, "fp32", 256, tmp_path, try_batch=never_called)
        assert (choice.batch_size, choice.source) == (CPU_BATCH_SIZE, "cpu")
    assert not profile_path(tmp_path).exists()
    assert resolve_batch_size("12", tiny_vae, "cuda:0", "fp32", 256, tmp_path).batch_size == 12  # a number is kept


def test_on_a_gpu_half_the_largest_fit_is_used_and_cached(tiny_vae, tmp_path):
    logs: list[str] = []
    calls: list[int] = []
    choice = auto_batch_size(tiny_vae, "cuda:0", "bf16", 256, tmp_path, try_batch=oom_above(100, calls), gpu=H100, log=logs.append)
    assert (choice.batch_size, choice.source, choice.largest_fit) == (32, "probe", 64)
    assert calls == [1, 2, 4, 8, 16, 32, 64, 128]
    assert "64 image(s) per pass fit, using 32" in logs[0]
    meta = choice.as_metadata()
    assert meta["tried"]["128"] is False and meta["gpu"] == H100
    # a later run (another process: the file is all it shares) skips the search
    again = auto_batch_size(tiny_vae, "cuda:1", "bf16", 256, tmp_path, try_batch=never_called, gpu=H100)
    assert (again.batch_size, again.source, again.largest_fit) == (32, "cache", 64)
    assert resolve_batch_size("auto", tiny_vae, "cuda:1", "bf16", 256, tmp_path, try_batch=never_called, gpu=H100).source == "cache"
    # another precision, crop size, GPU memory or cap is another key: searched again
    assert auto_batch_size(tiny_vae, "cuda:0", "fp32", 256, tmp_path, try_batch=oom_above(40), gpu=H100).batch_size == 16
    assert auto_batch_size(tiny_vae, "cuda:0", "bf16", 512, tmp_path, try_batch=oom_above(20), gpu=H100).batch_size == 8
    small = {**H100, "total_memory": 24_000_000_000}
    assert auto_batch_size(tiny_vae, "cuda:0", "bf16", 256, tmp_path, try_batch=oom_above(9), gpu=small).batch_size == 4
    assert auto_batch_size(tiny_vae, "cuda:0", "bf16", 256, tmp_path, cap=8, try_batch=oom_above(10**6), gpu=H100).batch_size == 8
    entries = json.loads(profile_path(tmp_path).read_text())["batch_sizes"]
    assert len(entries) == 5
    assert all(e["vae"]["requested"] == "tiny-random" for e in entries.values())


def test_one_image_that_does_not_fit_is_a_clear_error(tiny_vae, tmp_path):
    with pytest.raises(BatchSizeProbeError, match=r"One 256x256 image does not fit on cuda:0 \(Fake H100, 79.2 GiB\)"):
        auto_batch_size(tiny_vae, "cuda:0", "fp32", 256, tmp_path, try_batch=oom_above(0), gpu=H100)
    assert not profile_path(tmp_path).exists()


class _RaisesAbove:
    """The tiny VAE, except that a forward pass of more than ``limit`` images raises ``error``."""

    def __init__(self, vae, limit: int, error: type[Exception]):
        self.vae, self.limit, self.error, self.info = vae, limit, error, vae.info

    @property
    def dtype(self):
        return self.vae.dtype

    def cast(self, dtype):
        return _RaisesAbove(self.vae.cast(dtype), self.limit, self.error)

    def encode(self, x):
        if x.shape[0] > self.limit:
            raise self.error(f"CUDA out of memory. Tried to allocate {x.shape[0]} images")
        return self.vae.encode(x)


def test_the_real_probe_runs_the_encoder_and_catches_out_of_memory(tiny_vae):
    import torch

    from imagenet_int8_assets_tests.support.builds import torch_threads

    assert forward_probe(tiny_vae, "cpu", "fp32", 32)(3) is True
    with torch_threads(1):  # one thread: passes hold exactly n images
        probe = forward_probe(_RaisesAbove(tiny_vae, 4, torch.OutOfMemoryError), "cpu", "bf16", 32)
        assert [probe(n) for n in (1, 2, 4, 8)] == [True, True, True, False]
        assert forward_probe(_RaisesAbove(tiny_vae, 0, torch.OutOfMemoryError), "cpu", "fp32", 32)(1) is False
        with pytest.raises(ValueError):  # anything else is not a memory limit: it propagates
            forward_probe(_RaisesAbove(tiny_vae, 1, ValueError), "cpu", "fp32", 32)(2)


def test_encoder_flops(tiny_vae, tmp_path):
    import torch

    from imagenet_int8_assets.core.latents.vae import VaeInfo, load_vae

    class OneConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1, bias=False)

        def encode(self, x):
            return self.conv(x)

    # a multiply-add is 2 FLOPs: 3 inputs x 4 outputs x 8 x 8 pixels x 2
    toy = type("Toy", (), {"model": OneConv(), "info": VaeInfo("toy", "random", family="aura")})()
    assert count_encoder_flops(toy, 8) == 3 * 4 * 64 * 2
    assert count_encoder_flops(tiny_vae, 256) == 731_512_832
    assert count_encoder_flops(tiny_vae, 512) > 4 * count_encoder_flops(tiny_vae, 256)  # attention is quadratic
    # the weights stay where they were: counted on a meta copy
    assert all(p.device.type == "cpu" for p in tiny_vae.model.parameters())
    meta = _meta_copy(tiny_vae.model)
    assert all(p.is_meta for p in meta.parameters()) and meta is not tiny_vae.model
    # the published figure (REFERENCE): the SDXL encoder does 272.7 GFLOPs per 256x256 image
    assert count_encoder_flops(load_vae("sdxl-random"), 256) == pytest.approx(272.7e9, abs=0.05e9)
    # cached under the output: a later run reads the file
    assert encoder_flops(tiny_vae, 256, tmp_path) == 731_512_832
    data = json.loads(profile_path(tmp_path).read_text())
    (key,) = data["flops"]
    data["flops"][key]["flops_per_image"] = 123
    profile_path(tmp_path).write_text(json.dumps(data))
    assert encoder_flops(tiny_vae, 256, tmp_path) == 123
    assert encoder_flops(tiny_vae, 256) == 731_512_832  # no output: counted


def test_tflops():
    assert tflops(1000, 272_722_165_760) == pytest.approx(272.72, abs=0.01)
    assert tflops(0.4, 272.7e9) == pytest.approx(0.109, abs=0.001)  # the 2-core CPU of REFERENCE
    assert tflops(100, 10**12, passes_per_image=2) == 200.0
    assert np.isfinite(tflops(0.0, 10**9))
