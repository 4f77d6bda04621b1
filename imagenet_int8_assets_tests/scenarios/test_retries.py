"""A transient failure does not need a human.

1. Out of memory while encoding is retried inside the step with fewer images per forward pass,
   and on the CPU the latents are byte-identical to a run that never ran out of memory. The
   failure is injected into a real tiny VAE (torch itself is not mocked).
2. The shipped instance settings retry a crashed run and not a step that fails on purpose (a run
   whose process is killed, failed and re-executed by a real daemon, is in
   servers/test_run_retries_by_the_daemon.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from imagenet_int8_assets.core.latents.encode import (
    EncodeOutOfMemory,
    encode_posterior,
    encode_record,
    is_out_of_memory,
    precision_error,
)
from imagenet_int8_assets.build.instance import SHIPPED_DAGSTER_YAML
from imagenet_int8_assets_tests.support.builds import crops, torch_threads
from imagenet_int8_assets_tests.support.vae_doubles import WrappedVae

# ------------------------------------------------------------------------------------------
# 1. out of memory in encoding


class OutOfMemoryAbove(WrappedVae):
    """A real LoadedVae whose forward passes of more than ``limit`` images raise ``error`` (as a
    GPU, or the host, would run out of memory); records every pass it sees with torch's threads."""

    def __init__(self, vae, limit: int, error=None, passes: list | None = None):
        super().__init__(vae)
        self.limit, self.passes = limit, passes if passes is not None else []
        self.error = error or (lambda n: torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB (injected: {n} images > {limit})"
        ))

    def cast(self, dtype):
        return OutOfMemoryAbove(self.vae.cast(dtype), self.limit, self.error, self.passes)

    def encode(self, x):
        self.passes.append((int(x.shape[0]), torch.get_num_threads()))
        if x.shape[0] > self.limit:
            raise self.error(int(x.shape[0]))
        return self.vae.encode(x)


@pytest.fixture(scope="module")
def images():
    return crops(5)


def test_out_of_memory_is_retried_with_fewer_images_per_pass_and_gives_the_same_bytes(tiny_vae):
    images = crops(9)
    with torch_threads(2):
        reference = encode_posterior(tiny_vae, images, "cpu", batch_size=2)
        flaky = OutOfMemoryAbove(tiny_vae, limit=2)
        notes, done = [], []
        post = encode_posterior(flaky, images, "cpu", batch_size=8, log=notes.append, progress=done.append)
        assert torch.get_num_threads() == 2
        record = encode_record("cpu", 8, post)
    assert post.mean.tobytes() == reference.mean.tobytes()
    assert post.std.tobytes() == reference.std.tobytes()
    # 8 and 4 images ran out of memory; the failed images were redone with 2 per pass, and the
    # passes after them kept 2 (the last one padded to the thread count)
    assert [n for n, _ in flaky.passes] == [8, 4, 2, 2, 2, 2, 2]
    assert post.oom_retries == 2 and post.forward_batch_sizes == (8, 4, 2) and post.final_batch_size == 2
    assert post.cpu_threads_used == (2, 2, 2) and done == [2, 4, 6, 8, 9]
    assert len(notes) == 2 and notes == post.notes
    assert "Out of memory encoding images 0-7 of 9 on cpu with 8 image(s) per forward pass" in notes[0]
    assert "OutOfMemoryError: CUDA out of memory" in notes[0] and "retrying them with 4 image(s)" in notes[0]
    assert "same bytes on the CPU" in notes[1] and "IMAGENET_INT8_BATCH_SIZE" in notes[1]
    # the record says what ran: the configured size, the planned pass and every pass size used
    assert record["batch_size"] == 8 and record["forward_batch_size"] == 8
    assert record["oom_retries"] == 2 and record["forward_batch_sizes"] == [8, 4, 2]
    assert "cpu_threads_used" not in record
    assert post.oom_report()["final_batch_size"] == 2
    # no retries: the record is unchanged
    assert set(encode_record("cpu", 8, reference)) == {"device_type", "batch_size", "forward_batch_size", "cpu_threads", "torch"}


def test_below_one_image_per_thread_the_threads_are_halved_and_the_bytes_are_one_threads(tiny_vae, images):
    """Every image ends up encoded alone on one thread: the bytes are exactly those (on CPUs whose
    kernels sum alike on one and two threads, also those of the two-thread run: docs/GUARANTEES.md, Reproducibility)."""
    with torch_threads(1):
        reference = encode_posterior(tiny_vae, images, "cpu", batch_size=1)
    with torch_threads(2):
        flaky = OutOfMemoryAbove(tiny_vae, limit=1)
        post = encode_posterior(flaky, images, "cpu", batch_size=4, log=lambda _: None)
        assert torch.get_num_threads() == 2  # restored
        record = encode_record("cpu", 4, post)
    assert post.mean.tobytes() == reference.mean.tobytes() and post.std.tobytes() == reference.std.tobytes()
    assert flaky.passes[:3] == [(4, 2), (2, 2), (1, 1)] and all(p == (1, 1) for p in flaky.passes[2:])
    assert post.forward_batch_sizes == (4, 2, 1) and post.cpu_threads_used == (2, 2, 1)
    assert record["cpu_threads"] == 2 and record["cpu_threads_used"] == [2, 1]


def test_out_of_memory_with_one_image_per_pass_says_what_to_do(tiny_vae, images):
    with torch_threads(2):
        flaky = OutOfMemoryAbove(tiny_vae, limit=0)
        with pytest.raises(EncodeOutOfMemory) as raised:
            encode_posterior(flaky, images, "cpu", batch_size=4, log=lambda _: None)
        assert torch.get_num_threads() == 2
    message = str(raised.value)
    assert "Out of memory encoding images 0-0 of 5 on cpu with 1 image(s) per forward pass on 1 CPU thread(s)" in message
    assert "IMAGENET_INT8_BATCH_SIZE=4" in message and "started with 4 per pass, 2 retries" in message
    assert "lower IMAGENET_INT8_BATCH_SIZE, use another device (IMAGENET_INT8_DEVICE)" in message
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)
    assert [n for n, _ in flaky.passes] == [4, 2, 1]


def test_other_backends_out_of_memory_errors_are_retried_and_other_errors_are_not(tiny_vae, images):
    mps = OutOfMemoryAbove(tiny_vae, 2, error=lambda n: RuntimeError(f"MPS backend out of memory (injected, {n} images)"))
    cpu_allocator = OutOfMemoryAbove(
        tiny_vae, 2, error=lambda n: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    )
    with torch_threads(1):
        reference = encode_posterior(tiny_vae, images, "cpu", batch_size=2)
        for flaky in (mps, cpu_allocator):
            post = encode_posterior(flaky, images, "cpu", batch_size=4, log=lambda _: None)
            assert post.oom_retries == 1 and post.mean.tobytes() == reference.mean.tobytes()
        broken = OutOfMemoryAbove(tiny_vae, 2, error=lambda n: RuntimeError("Given groups=1, weight of size [8, 3, 3, 3]"))
        with pytest.raises(RuntimeError, match="Given groups=1"):
            encode_posterior(broken, images, "cpu", batch_size=4)
        assert len(broken.passes) == 1  # not retried
    assert not is_out_of_memory(EncodeOutOfMemory("Out of memory encoding ..."))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x")) and is_out_of_memory(MemoryError())


@pytest.mark.slow
def test_low_precision_and_its_precision_report_retry_too(tiny_vae, images):
    with torch_threads(2):
        clean = precision_error(tiny_vae, images[:4], "cpu", "bf16", 12.0)
        flaky = precision_error(OutOfMemoryAbove(tiny_vae, limit=2), images[:4], "cpu", "bf16", 12.0)
        reference = encode_posterior(tiny_vae, images, "cpu", batch_size=2, precision="bf16")
        post = encode_posterior(OutOfMemoryAbove(tiny_vae, limit=2), images, "cpu", batch_size=4, precision="bf16", log=print)
    assert "oom_retries" not in clean and flaky.pop("oom_retries") == 2  # bf16 and its fp32 reference
    assert flaky == clean
    assert post.oom_retries == 1 and post.mean.tobytes() == reference.mean.tobytes()


# ------------------------------------------------------------------------------------------
# 2. a crashed run is retried by the shipped instance settings


def test_shipped_instance_settings_retry_crashed_runs_and_keep_pools_and_telemetry(tmp_path: Path):
    import dagster as dg

    shipped = yaml.safe_load(SHIPPED_DAGSTER_YAML.read_text())
    assert shipped["concurrency"] == {"pools": {"default_limit": 1, "granularity": "run"}}
    assert shipped["telemetry"] == {"enabled": False}
    assert shipped["run_retries"] == {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": False}
    (tmp_path / "dagster.yaml").write_text(SHIPPED_DAGSTER_YAML.read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:  # Dagster's own schema accepts it
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        assert not instance.run_retries_retry_on_asset_or_op_failure
        assert instance.run_monitoring_enabled and instance.run_monitoring_max_resume_run_attempts == 0
        assert instance.run_monitoring_poll_interval_seconds <= 10


def test_a_step_that_fails_is_not_retried_by_the_shipped_settings(tmp_path: Path):
    """Our steps fail with a clear dagster.Failure(allow_retries=False) on errors a retry repeats
    (bad settings, no usable images): Dagster decides, with the shipped settings, not to retry."""
    import dagster as dg

    @dg.asset
    def refuses():
        raise dg.Failure("No usable images: set IMAGENET_INT8_SOURCE ...", allow_retries=False)

    @dg.asset
    def breaks():
        raise ValueError("a bug")

    shutil.copyfile(SHIPPED_DAGSTER_YAML, tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        for asset in (refuses, breaks):
            result = dg.materialize([asset], instance=instance, raise_on_error=False)
            run = instance.get_run_by_id(result.run_id)
            assert run.status == dg.DagsterRunStatus.FAILURE
            assert run.tags["dagster/failure_reason"] == "STEP_FAILURE"
            assert run.tags["dagster/will_retry"] == "false", run.tags
