"""encode_stream: cropping overlapped with encoding gives the serial path's bytes.

The serial path is what the assets do today: ``crop_task`` over every file, then
``encode_posterior`` over the good crops of each class. The stream must give the same ids, the
same failures with the same reasons and the same mean/std (and flipped) bytes, whatever is slow,
and survive a crop worker that dies, without leaving a process behind.

The crop functions below run in spawned worker processes, which import this module to find them:
it imports nothing heavy at the top (conftest, which imports Dagster, only inside the tests).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from imagenet_int8_assets.core.crops.preprocess import crop_task
from imagenet_int8_assets_tests.support.vae_doubles import WrappedVae

SIZE = 32  # small crops keep the tiny VAE fast (fp16 is slow on the CPU); the crop recipe is the real one
RECIPE = "imagenet.int8"


# ------------------------------------------------------------------------------------------
# injected crop functions (module level: pickled by reference into the workers)


def slow_crop(task):
    time.sleep(0.03)
    return crop_task(task)


def counting_crop(task):
    """crop_task, leaving a marker per task started in <source>/../started (for the queue bound)."""
    path = Path(task[0])
    started = path.parent.parent / "started"
    started.mkdir(exist_ok=True)
    (started / path.name).touch()
    return crop_task(task)


def dying_crop(task):
    """The worker dies on 'kill-always' (SIGKILL) and 'exit-always' (os._exit(3)) every time, on
    'die-once' only the first time; everything else is crop_task."""
    name = Path(task[0]).name
    if "kill-always" in name:
        os.kill(os.getpid(), signal.SIGKILL)
    if "exit-always" in name:
        os._exit(3)
    if "die-once" in name:
        marker = Path(task[0] + ".died")
        if not marker.exists():
            marker.touch()
            os._exit(4)
    return crop_task(task)


# ------------------------------------------------------------------------------------------
# helpers


class SlowVae(WrappedVae):
    """A real LoadedVae whose every forward pass first sleeps ``seconds`` (a slow encoder); calls
    ``before`` (if given) at each pass."""

    def __init__(self, vae, seconds: float, before=None):
        self.vae, self.seconds, self.before = vae, seconds, before

    def cast(self, dtype):
        return SlowVae(self.vae.cast(dtype), self.seconds, self.before)

    def encode(self, x):
        if self.before is not None:
            self.before()
        time.sleep(self.seconds)
        return self.vae.encode(x)


class AlwaysOutOfMemory(SlowVae):
    def encode(self, x):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory (injected)")


def tasks_for(files) -> list[tuple]:
    from imagenet_int8_assets.core.source.images import DEFAULT_MAX_PIXELS

    return [(str(f), RECIPE, SIZE, DEFAULT_MAX_PIXELS) for f in files]


def serial(vae, tasks, batch_size, precision="fp32", flip=False, crop=crop_task):
    """Today's path: every crop first, then encode_posterior over the good ones."""
    from imagenet_int8_assets.core.latents.encode import encode_posterior

    results = [crop(t) for t in tasks]
    ok = [i for i, (arr, _) in enumerate(results) if arr is not None]
    failed = [(i, reason) for i, (arr, reason) in enumerate(results) if arr is None]
    crops = np.stack([results[i][0] for i in ok])
    post = encode_posterior(vae, crops, "cpu", batch_size, precision)
    flipped = encode_posterior(vae, crops, "cpu", batch_size, precision, flip=True) if flip else None
    return ok, failed, crops, post, flipped


def assert_same(group, ok, failed, post, flipped=None):
    assert group.ok == ok
    assert group.failed == failed
    assert group.posterior.mean.tobytes() == post.mean.tobytes()
    assert group.posterior.std.tobytes() == post.std.tobytes()
    assert group.posterior.reencoded_fp32 == post.reencoded_fp32
    if flipped is None:
        assert group.flipped is None
    else:
        assert group.flipped.mean.tobytes() == flipped.mean.tobytes()
        assert group.flipped.std.tobytes() == flipped.std.tobytes()


def child_pids() -> set[int]:
    """This process's children, zombies included (a child never joined shows up too); without
    multiprocessing's resource tracker, which lives as long as this process."""
    from multiprocessing import resource_tracker

    me, out = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            out.add(int(entry))
    return out - {getattr(resource_tracker._resource_tracker, "_pid", None)}


def shared_memory_names() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(("psm_", "sem.mp-", "mp-"))}
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def no_process_left_behind():
    before = child_pids()
    yield
    import multiprocessing

    assert multiprocessing.active_children() == []
    assert child_pids() <= before


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """22 JPEGs of one class, a text file posing as a JPEG and a truncated JPEG among them."""
    from imagenet_int8_assets_tests.support.builds import make_image_folder

    root = make_image_folder(tmp_path_factory.mktemp("pipeline") / "src", {"n01440764": 22})
    folder = root / "n01440764"
    (folder / "n01440764_0007b.JPEG").write_text("this is not an image")
    data = (folder / "n01440764_0020.JPEG").read_bytes()
    (folder / "n01440764_0020b.JPEG").write_bytes(data[: len(data) // 3])
    return folder


@pytest.fixture(scope="module")
def tasks(source):
    return tasks_for(sorted(source.glob("*.JPEG")))


@pytest.fixture(scope="module")
def reference(tiny_vae, tasks):
    from imagenet_int8_assets_tests.support.builds import torch_threads

    with torch_threads(2):
        return serial(tiny_vae, tasks, batch_size=4, flip=True)


# ------------------------------------------------------------------------------------------
# tests


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_overlapped_gives_the_serial_bytes_ids_failures_and_flips(tiny_vae, tasks, reference):
    from imagenet_int8_assets.core.latents.pipeline import encode_stream
    from imagenet_int8_assets_tests.support.builds import torch_threads

    ok, failed, crops, post, flipped = reference
    assert len(failed) == 2 and "cannot decode" in failed[0][1] and len(ok) == 22
    kept, progress = [], []
    with torch_threads(2):
        # chunks of 5 tasks against passes of 4 images: passes span chunks and failures
        result = encode_stream(
            tiny_vae, tasks, "cpu", batch_size=4, workers=2, chunk_size=5, flip=True,
            keep_crops=lambda group, indices, batch: kept.append((group, indices, batch)),
            progress=lambda group, done: progress.append(done),
        )
        inline = encode_stream(tiny_vae, tasks, "cpu", batch_size=5, workers=0, chunk_size=7)
    assert_same(result.groups[0], ok, failed, post, flipped)
    assert_same(inline.groups[0], ok, failed, post)
    # the crops handed over are the serial crops, in order, once each
    assert [i for _, indices, _ in kept for i in indices] == ok
    np.testing.assert_array_equal(np.concatenate([b for _, _, b in kept]), crops)
    assert progress == sorted(progress) and progress[-1] == len(tasks)
    t = result.timing
    assert t.images == len(tasks) and t.chunks == 5 and t.workers == 2 and t.worker_deaths == 0
    assert t.crop_s > 0 and t.encode_s > 0 and t.wall_s >= t.encode_s
    assert 1 <= t.peak_queued <= t.queue_batches == 4
    assert set(t.as_dict()) >= {"crop_s", "encode_s", "encoder_waited_s", "producers_waited_s"}


@pytest.mark.timeout(120)
def test_several_classes_in_one_stream_give_each_class_its_serial_bytes(tiny_vae, tasks):
    from imagenet_int8_assets.core.latents.pipeline import encode_stream
    from imagenet_int8_assets_tests.support.builds import torch_threads

    first, second = tasks[:12], tasks[12:]  # the bad file is in the first, the truncated one in the second
    handed = []  # on_group: each class as soon as it is encoded, in order, with its posteriors
    with torch_threads(2):
        expected = [serial(tiny_vae, part, batch_size=4, precision="bf16") for part in (first, second)]
        result = encode_stream(
            tiny_vae, tasks, "cpu", batch_size=4, precision="bf16", workers=2, chunk_size=5, groups=[len(first), len(second)]
        )
        streamed = encode_stream(
            tiny_vae, tasks, "cpu", batch_size=4, precision="bf16", workers=2, chunk_size=5, groups=[len(first), len(second)],
            on_group=lambda group, r: handed.append((group, list(r.ok), list(r.failed), r.posterior)),
        )
    assert len(result.groups) == 2
    for group, (ok, failed, _, post, _) in zip(result.groups, expected):
        assert_same(group, ok, failed, post)
    with pytest.raises(ValueError, match="groups"):
        result.posterior
    assert [g for g, *_ in handed] == [0, 1]
    for (_, ok, failed, post), (e_ok, e_failed, _, e_post, _), kept in zip(handed, expected, streamed.groups):
        assert (ok, failed) == (e_ok, e_failed) == (kept.ok, kept.failed)
        np.testing.assert_array_equal(post.mean, e_post.mean)
        np.testing.assert_array_equal(post.std, e_post.std)
        assert kept.posterior is None  # handed over, not kept: one class's posteriors in memory at a time


@pytest.mark.timeout(120)
def test_a_class_is_written_while_the_next_one_encodes_and_a_write_error_stops_the_stream(tiny_vae, tasks):
    import threading

    from imagenet_int8_assets.core.latents.pipeline import encode_stream

    sizes = [8, 8, len(tasks) - 16]
    next_encoding = threading.Event()
    handed, overlapped = [], []

    def progress(group: int, done: int) -> None:  # the encoding thread
        if group == 1 and done > 0:
            next_encoding.set()

    def write(group: int, result) -> None:  # the writer thread: class 0 waits for class 1's encode
        if group == 0:
            overlapped.append(next_encoding.wait(timeout=30))
        handed.append((group, list(result.ok), result.posterior.mean.copy()))

    streamed = encode_stream(
        tiny_vae, tasks, "cpu", batch_size=4, workers=1, chunk_size=4, groups=sizes, progress=progress, on_group=write
    )
    assert overlapped == [True], "class 1 was not encoded while class 0 was being written"
    assert [g for g, *_ in handed] == [0, 1, 2]
    for (group, ok, mean), kept, part in zip(handed, streamed.groups, (tasks[:8], tasks[8:16], tasks[16:])):
        e_ok, _, _, e_post, _ = serial(tiny_vae, part, batch_size=4)
        assert ok == e_ok == kept.ok
        np.testing.assert_array_equal(mean, e_post.mean)

    written = []

    def failing(group: int, result) -> None:
        if group == 1:
            raise OSError(28, "No space left on device")
        written.append(group)

    with pytest.raises(OSError, match="No space left"):
        encode_stream(tiny_vae, tasks, "cpu", batch_size=4, workers=1, chunk_size=4, groups=sizes, on_group=failing)
    assert written == [0]  # the class before the error is written, none after it


@pytest.mark.timeout(120)
def test_a_class_without_images_gets_latents_of_the_crop_size(tiny_vae, tasks):
    """An empty class between others takes the shape from their tasks; with no task at all the
    shape comes from ``image_hw`` (0, C, S/8, S/8) as encode_posterior gives it, never (0, C, 0, 0)."""
    from imagenet_int8_assets.core.latents.encode import encode_posterior
    from imagenet_int8_assets.core.latents.pipeline import encode_stream

    expected = encode_posterior(tiny_vae, np.empty((0, SIZE, SIZE, 3), dtype=np.uint8), "cpu", 4, "fp32")
    assert expected.mean.shape[2:] != (0, 0)
    between = encode_stream(tiny_vae, tasks[:5], "cpu", batch_size=4, workers=0, groups=[0, 5])
    handed = []
    alone = encode_stream(
        tiny_vae, [], "cpu", batch_size=4, workers=2, flip=True, groups=[0, 0], image_hw=(SIZE, SIZE),
        on_group=lambda group, r: handed.append((group, r.posterior, r.flipped)),
    )
    assert [g for g, _, _ in handed] == [0, 1] and [g.ok for g in alone.groups] == [[], []]
    for post in [between.groups[0].posterior] + [p for _, post, flip in handed for p in (post, flip)]:
        assert post.mean.shape == expected.mean.shape and post.mean.dtype == expected.mean.dtype
        assert post.std.shape == expected.std.shape


@pytest.mark.timeout(120)
def test_fp16_overflows_are_reencoded_in_fp32_in_the_stream_too(tasks):
    import torch

    from imagenet_int8_assets.core.latents.pipeline import encode_stream
    from imagenet_int8_assets.core.latents.vae import load_vae
    from imagenet_int8_assets_tests.support.builds import torch_threads

    overflowing = load_vae("tiny-random")
    with torch.no_grad():
        overflowing.model.encoder.conv_in.weight.mul_(1e5)
    some = tasks[:7]
    with torch_threads(2):
        ok, failed, _, post, _ = serial(overflowing, some, batch_size=2, precision="fp16")
        result = encode_stream(overflowing, some, "cpu", batch_size=2, precision="fp16", workers=1, chunk_size=3)
    assert post.reencoded_fp32 > 0 and np.isfinite(post.mean).all()
    assert_same(result.groups[0], ok, failed, post)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_slow_producer_or_a_slow_encoder_changes_the_timing_not_the_bytes(tiny_vae, tasks, reference):
    from imagenet_int8_assets.core.latents.pipeline import encode_stream
    from imagenet_int8_assets_tests.support.builds import torch_threads

    ok, failed, _, post, flipped = reference
    some = tasks[:14]
    n_ok = sum(1 for i in ok if i < 14)
    with torch_threads(2):
        slow_crops = encode_stream(tiny_vae, some, "cpu", batch_size=4, workers=1, chunk_size=4, crop_fn=slow_crop)
        slow_encoder = encode_stream(
            SlowVae(tiny_vae, 0.1), some, "cpu", batch_size=4, workers=2, chunk_size=2, queue_batches=2, flip=True
        )
    for result in (slow_crops, slow_encoder):
        group = result.groups[0]
        assert group.ok == ok[:n_ok] and group.failed == [f for f in failed if f[0] < 14]
        assert group.posterior.mean.tobytes() == post.mean[:n_ok].tobytes()
        assert group.posterior.std.tobytes() == post.std[:n_ok].tobytes()
    assert slow_encoder.groups[0].flipped.mean.tobytes() == flipped.mean[:n_ok].tobytes()
    # who waited for whom: 14 crops at >= 30 ms on one worker keep the encoder waiting; an encoder
    # at >= 100 ms a pass (two per 4 images, with the flip) fills a 2-chunk queue while the workers wait
    assert slow_crops.timing.crop_s >= 0.42 and slow_crops.timing.encoder_waited_s >= 0.2
    assert slow_encoder.timing.producers_waited_s >= 0.1 and slow_encoder.timing.encode_s >= 0.6
    assert slow_encoder.timing.peak_queued == 2


@pytest.mark.timeout(120)
def test_the_queue_bounds_how_far_the_workers_run_ahead(tiny_vae, source, tmp_path):
    import shutil

    from imagenet_int8_assets.core.latents.pipeline import encode_stream

    folder = tmp_path / "src" / "n01440764"
    folder.mkdir(parents=True)
    for f in sorted(source.glob("n01440764_00[0-2]?.JPEG"))[:18]:
        shutil.copy(f, folder / f.name)
    tasks = tasks_for(sorted(folder.glob("*.JPEG")))
    started_dir = tmp_path / "src" / "started"
    chunk, queue = 3, 2
    consumed, seen = [], []

    def observe():  # at every forward pass: tasks the workers started, chunks handed to the consumer
        seen.append((len(list(started_dir.glob("*"))) if started_dir.exists() else 0, len(consumed)))

    result = encode_stream(
        SlowVae(tiny_vae, 0.04, before=observe), tasks, "cpu", batch_size=2, workers=2, chunk_size=chunk,
        queue_batches=queue, crop_fn=counting_crop, keep_crops=lambda g, indices, b: consumed.append(indices),
    )
    assert len(result.groups[0].ok) == len(tasks) and result.timing.peak_queued == queue
    # never more than `queue` chunks beyond those consumed were started ...
    assert all(started <= (chunks + queue) * chunk for started, chunks in seen), seen
    # ... and the workers did run ahead of the encoder
    assert any(started > chunks * chunk for started, chunks in seen), seen


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_dying_crop_worker_costs_only_its_own_image(tiny_vae, source, tmp_path):
    import shutil

    from imagenet_int8_assets.core.latents.pipeline import WORKER_DIED, encode_stream
    from imagenet_int8_assets_tests.support.builds import torch_threads

    folder = tmp_path / "n01440764"
    folder.mkdir()
    files = sorted(source.glob("n01440764_00??.JPEG"))[:12]
    for f in files:
        shutil.copy(f, folder / f.name)
    # copies of good images that kill their worker: always (by signal or exit), or only once
    shutil.copy(files[3], folder / "n01440764_0003-kill-always.JPEG")
    shutil.copy(files[9], folder / "n01440764_0009-die-once.JPEG")
    shutil.copy(files[10], folder / "n01440764_0010-exit-always.JPEG")
    tasks = tasks_for(sorted(folder.glob("*.JPEG")))
    names = [Path(t[0]).name for t in tasks]
    always = {names.index("n01440764_0003-kill-always.JPEG"), names.index("n01440764_0010-exit-always.JPEG")}
    with torch_threads(2):
        # the serial path, with the images that always kill their worker left out
        ok, _, _, post, _ = serial(tiny_vae, [t for i, t in enumerate(tasks) if i not in always], batch_size=4)
        kept = [i for i in range(len(tasks)) if i not in always]
        ok = [kept[i] for i in ok]
        started = time.monotonic()
        result = encode_stream(tiny_vae, tasks, "cpu", batch_size=4, workers=2, chunk_size=4, crop_fn=dying_crop)
        seconds = time.monotonic() - started
    group = result.groups[0]
    assert group.ok == ok and names.index("n01440764_0009-die-once.JPEG") in group.ok
    assert group.posterior.mean.tobytes() == post.mean.tobytes()
    assert group.posterior.std.tobytes() == post.std.tobytes()
    reasons = dict(group.failed)
    assert set(reasons) == always
    assert reasons[names.index("n01440764_0003-kill-always.JPEG")] == f"{WORKER_DIED} (killed by signal 9 (SIGKILL))"
    assert reasons[names.index("n01440764_0010-exit-always.JPEG")] == f"{WORKER_DIED} (exit code 3)"
    # at least: a pool (die-once's first death may be in it too: a pool counts once), and the two
    # tries alone of each image that always dies
    assert result.timing.worker_deaths >= 5 and result.timing.isolated_images >= 3
    assert seconds < 90


@pytest.mark.timeout(120)
def test_an_encoder_error_stops_the_workers_and_leaves_nothing_behind(tiny_vae, tasks):
    from imagenet_int8_assets.core.latents.encode import EncodeOutOfMemory
    from imagenet_int8_assets.core.latents.pipeline import encode_stream

    shm = shared_memory_names()
    started = time.monotonic()
    with pytest.raises(EncodeOutOfMemory, match="One image does not fit"):
        encode_stream(
            AlwaysOutOfMemory(tiny_vae, 0), tasks * 4, "cpu", batch_size=2, workers=2, chunk_size=2, crop_fn=slow_crop,
            log=lambda _: None,
        )
    # the chunks not started were cancelled: far less than cropping all 96 tasks (>= 1.4 s per worker)
    assert time.monotonic() - started < 10
    assert shared_memory_names() <= shm


@pytest.mark.timeout(60)
def test_a_crop_function_error_is_raised_not_recorded(tiny_vae, tasks):
    from imagenet_int8_assets.core.latents.pipeline import encode_stream

    with pytest.raises(ValueError, match="unpack"):  # crop_task given a 1-tuple: a bug, not a bad image
        encode_stream(tiny_vae, [(t[0],) for t in tasks[:6]], "cpu", batch_size=4, workers=1, chunk_size=3)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_crop_workers_die_with_a_process_killed_mid_stream(tasks, tmp_path):
    """SIGKILL gives the stream no chance to shut its pool down; the workers must not live on."""
    import json
    import subprocess
    import sys

    script = tmp_path / "stream.py"
    script.write_text(
        "import json, sys\n"
        "from imagenet_int8_assets.core.latents.pipeline import encode_stream\n"
        "from imagenet_int8_assets.core.latents.vae import load_vae\n"
        "from imagenet_int8_assets_tests.core.latents.test_pipeline import slow_crop\n"
        "if __name__ == '__main__':\n"
        "    tasks = [tuple(t) for t in json.loads(sys.argv[1])] * 40\n"
        "    encode_stream(load_vae('tiny-random'), tasks, 'cpu', batch_size=4, workers=2, chunk_size=2, crop_fn=slow_crop)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), json.dumps([list(t) for t in tasks])])

    def workers() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == proc.pid and b"spawn_main" in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        return found

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    try:
        deadline = time.monotonic() + 90
        while len(started := workers()) < 2:
            assert proc.poll() is None, "the stream ended before its workers were seen"
            assert time.monotonic() < deadline, "no crop workers within 90 s"
            time.sleep(0.1)
        time.sleep(1.0)  # cropping
        proc.kill()
        proc.wait(timeout=30)
        gone = time.monotonic() + 20
        while any(alive(p) for p in started) and time.monotonic() < gone:
            time.sleep(0.1)
        assert not any(alive(p) for p in started), f"crop workers outlived their killed process: {started}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
