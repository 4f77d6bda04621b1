"""The stored latent value: deterministic per image, independent of batching and order."""

from __future__ import annotations

import numpy as np
import pytest

from imagenet_int8_assets.core.latents.encode import image_seed, non_finite_count, select_latent, standard_normal
from imagenet_int8_assets_tests.support.vae_doubles import WrappedVae


def test_sample_is_seeded_by_run_seed_and_image_id():
    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=(3, 4, 8, 8)).astype(np.float32), rng.uniform(0.1, 1, (3, 4, 8, 8)).astype(np.float32)
    ids = ["a/1.JPEG", "a/2.JPEG", "b/3.JPEG"]
    first = select_latent(mean, std, ids, "sample", run_seed=7)
    np.testing.assert_array_equal(first, select_latent(mean, std, ids, "sample", run_seed=7))
    # order and batching do not matter: each image's noise depends only on (seed, id)
    reordered = select_latent(mean[::-1], std[::-1], ids[::-1], "sample", run_seed=7)
    np.testing.assert_array_equal(first, reordered[::-1])
    np.testing.assert_array_equal(first[1:2], select_latent(mean[1:2], std[1:2], ids[1:2], "sample", 7))
    assert not np.array_equal(first, select_latent(mean, std, ids, "sample", run_seed=8))
    np.testing.assert_allclose(first[0], mean[0] + std[0] * standard_normal(ids[0], 7, (4, 8, 8)))
    noise = (first - mean) / std
    assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2
    np.testing.assert_array_equal(select_latent(mean, std, ids, "mean", 7), mean)
    with pytest.raises(ValueError, match="IMAGENET_INT8_LATENT_VALUE"):
        select_latent(mean, std, ids, "mode", 7)


def test_image_seed_is_stable():
    assert image_seed(0, "n01440764/x.JPEG") == image_seed(0, "n01440764/x.JPEG")
    assert image_seed(0, "a") != image_seed(1, "a") != image_seed(0, "b")
    assert 0 <= image_seed(123, "é") < 2**63


def test_non_finite_count():
    assert non_finite_count(np.array([1.0, np.nan, np.inf]), np.array([-np.inf, 0.0])) == 3
    assert non_finite_count(np.zeros(4)) == 0


def _overflowing_vae():
    """tiny-random with a huge first convolution: fp16 overflows on busy images, not on flat ones."""
    import torch

    from imagenet_int8_assets.core.latents.vae import load_vae

    vae = load_vae("tiny-random")
    with torch.no_grad():
        vae.model.encoder.conv_in.weight.mul_(1e5)
    return vae


BUSY = [0, 1, 5, 6]  # the busy images of the 7 crops below (busy, busy, 3 flat, busy, busy): they overflow fp16


def _busy_and_flat():
    rng = np.random.default_rng(0)
    busy = rng.integers(0, 256, (2, 64, 64, 3))
    flat = np.full((3, 64, 64, 3), 128)
    return np.concatenate([busy, flat]).astype(np.uint8)


def test_fp16_overflow_is_reencoded_in_fp32_per_sample():
    import torch

    from imagenet_int8_assets.core.latents.encode import encode_posterior, to_model_input

    vae, crops = _overflowing_vae(), _busy_and_flat()
    with torch.inference_mode():  # the guard is needed: plain fp16 really overflows here
        raw, _ = vae.cast(torch.float16).encode(to_model_input(crops, "cpu").half())
    assert torch.isfinite(raw).flatten(1).all(1).tolist() == [False, False, True, True, True]
    fp16 = encode_posterior(vae, crops, "cpu", batch_size=5, precision="fp16")
    fp32 = encode_posterior(vae, crops, "cpu", batch_size=5, precision="fp32")
    assert fp16.reencoded_fp32 == 2 and fp32.reencoded_fp32 == 0
    assert np.isfinite(fp16.mean).all() and np.isfinite(fp16.std).all()
    np.testing.assert_array_equal(fp16.mean[:2], fp32.mean[:2])  # redone exactly in fp32
    assert 0 < np.abs(fp16.mean[2:] - fp32.mean[2:]).max() < 0.05  # the rest stayed fp16


def test_precision_error_is_reported_in_quantization_steps():
    from imagenet_int8_assets.core.latents.encode import precision_error
    from imagenet_int8_assets.core.latents.vae import load_vae

    crops = _busy_and_flat()
    vae = load_vae("tiny-random")
    bf16 = precision_error(vae, crops, "cpu", "bf16", 12.0)
    assert bf16["images"] == 5 and 0 < bf16["rms_steps"] <= bf16["max_steps"] < 50
    assert precision_error(vae, crops, "cpu", "fp32", 12.0)["max_steps"] == 0.0
    guarded = precision_error(_overflowing_vae(), crops, "cpu", "fp16", 12.0)
    assert guarded["reencoded_fp32"] == 2 and np.isfinite(guarded["max_steps"])
    fp16 = precision_error(vae, crops, "cpu", "fp16", 12.0)
    assert 0 < fp16["rms_steps"] < bf16["rms_steps"]  # fp16 keeps 3 more mantissa bits than bf16


class _OutOfMemoryAbove(WrappedVae):
    """A real LoadedVae whose forward passes of more than ``limit`` images run out of memory;
    ``low_limit``: the same for its cast (low-precision) copy (default: ``limit``)."""

    def __init__(self, vae, limit: int, low_limit: int | None = None):
        self.vae, self.limit, self.low_limit = vae, limit, limit if low_limit is None else low_limit

    def cast(self, dtype):
        return _OutOfMemoryAbove(self.vae.cast(dtype), self.low_limit)

    def encode(self, x):
        import torch

        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {x.shape[0]} images > {self.limit})")
        return self.vae.encode(x)


def _feed(encoder, images, pieces):
    start = 0
    for n in pieces:
        encoder.add(images[start : start + n])
        start += n
    assert start == len(images)
    return encoder.finish()


def _same(a, b):
    assert a.mean.tobytes() == b.mean.tobytes() and a.std.tobytes() == b.std.tobytes()
    assert a.reencoded_fp32 == b.reencoded_fp32


@pytest.mark.slow
@pytest.mark.parametrize("in_flight", [0, 2])
def test_posterior_encoder_fed_in_pieces_gives_the_encode_posterior_bytes(in_flight):
    """Pieces of any size form the same passes; on the CPU ``in_flight=2`` runs the bookkeeping
    of passes queued ahead of their results that CUDA uses (collecting late, replaying on OOM)."""
    from imagenet_int8_assets.core.latents.encode import PosteriorEncoder, encode_posterior
    from imagenet_int8_assets.core.latents.vae import load_vae
    from imagenet_int8_assets_tests.support.builds import torch_threads

    # 7 crops of 32x32 (fp16 is slow on the CPU): busy, busy, 3 flat, busy, busy
    images = np.ascontiguousarray(np.concatenate([_busy_and_flat(), _busy_and_flat()[:2][::-1]])[:, :32, :32])
    pieces = [1, 0, 4, 1, 1]
    tiny, overflowing = load_vae("tiny-random"), _overflowing_vae()
    with torch_threads(2):
        for vae, precision, flip in ((tiny, "fp32", True), (overflowing, "fp16", False)):
            reference = encode_posterior(vae, images, "cpu", batch_size=4, precision=precision, flip=flip)
            done = []
            post = _feed(
                PosteriorEncoder(vae, "cpu", 4, precision, flip, done.append, in_flight=in_flight), images, pieces
            )
            _same(post, reference)
            assert done == sorted(done) and done[-1] == 7
        assert reference.reencoded_fp32 == 4  # the overflow guard ran (on the 4 busy images)
        # out of memory in the forward pass, and in the fp32 re-encode of overflows only (the low
        # precision passes fit): every retry replays what was not collected, with the same bytes
        for flaky, precision in ((_OutOfMemoryAbove(tiny, 2), "fp32"), (_OutOfMemoryAbove(overflowing, 1, 8), "fp16")):
            reference = encode_posterior(flaky.vae, images, "cpu", batch_size=4, precision=precision)
            notes = []
            post = _feed(
                PosteriorEncoder(flaky, "cpu", 4, precision, log=notes.append, in_flight=in_flight), images, pieces
            )
            if 1 in post.cpu_threads_used:
                # one image per pass no longer divides over 2 threads: the threads were halved, and the
                # images re-encoded then are those one thread computes (the busy ones, re-encoded in fp32
                # after the fp16 overflow). On some CPUs one thread sums in another order than two
                # (docs/GUARANTEES.md, Reproducibility): those rows equal each image encoded alone on one thread.
                with torch_threads(1):
                    alone = encode_posterior(flaky.vae, images, "cpu", batch_size=1, precision="fp32")
                for field in ("mean", "std"):
                    getattr(reference, field)[BUSY] = getattr(alone, field)[BUSY]
            _same(post, reference)
            assert post.oom_retries == len(notes) >= 1 and post.forward_batch_sizes[0] == 4
            assert torch_threads_now() == 2
    empty = PosteriorEncoder(tiny, "cpu", 4, image_hw=(64, 64)).finish()
    assert empty.mean.shape == (0, 4, 8, 8) and empty.std.shape == (0, 4, 8, 8)


def torch_threads_now() -> int:
    import torch

    return torch.get_num_threads()
