"""Cropping overlapped with encoding: worker processes decode and crop the next images while the
VAE encodes the current ones, with the same bytes as cropping everything first.

``encode_stream`` takes the ``CropTask``s (``core.crops.preprocess``) of one class, or of several classes in order, and
runs two sides at once::

    producers: `workers` spawned processes     consumer: this thread
    crop_fn over chunks of `chunk_size` tasks  -> the next chunk, in task order
    at most `queue_batches` chunks submitted   -> keep_crops(group, indices, crops)   (optional)
    or finished and not yet consumed           -> PosteriorEncoder.add (and the flipped one)

The bounded window of chunks is the queue: memory holds at most ``queue_batches * chunk_size``
crops waiting, plus less than one forward pass buffered in the encoder, whatever the class size.
A consumed chunk frees its slot at once, so the workers crop the following chunks while this
thread encodes.

On the CPU the encoder's forward passes run in this process on torch's threads while the workers
crop in theirs. On CUDA the encoder only queues work (``core.latents.encode.PosteriorEncoder``): crops go
up from pinned memory on a copy stream, up to two passes are queued ahead, results come back into
pinned memory on another stream and the host waits for them only when it collects them; so the
GPU computes while this thread takes the next chunk and copies it into pinned memory.

**Same bytes as the serial path.** The good crops of a group go to one encoder in task order, and
the encoder forms its forward passes from the stream of images exactly as ``encode_posterior``
does from the array of a class's good crops (images that do not fill a pass wait for the next
chunk): the same passes, out-of-memory retries and precision guard. So ids, failures (with the
same reasons: the same ``crop_fn``), mean, std and the flipped latents are byte-identical to
``crop_task`` over every file followed by ``encode_posterior`` over the good crops of each class
(on the CPU for any chunking, batch size and thread count; on a GPU the passes hold the same
images as the serial path's too).

**A crop worker that dies** (killed, out of memory, a crash in a decoder, ``os._exit``): the pool
reports it (``BrokenProcessPool``, noticed by the pool's own watcher, no polling loop of ours), a
fresh pool takes the chunks not yet submitted, and the images of every chunk the dead pool had not
finished are cropped again one at a time in a process of their own. An image whose own process dies
``ISOLATED_TRIES`` (2) times, each in a fresh one, is recorded as failed, with the reason "the
crop worker process died while cropping this image, also in 2 tries alone in a fresh process
(exit code N / killed by signal S (NAME))"; the others get exactly the results they would have had (a death that does not repeat costs
nothing but time). With ``workers=0`` everything runs in this process: no isolation.

An exception on either side (an error in ``crop_fn`` that is not a crop failure, the encoder's
``EncodeOutOfMemory``, a callback's error) cancels the chunks not started, lets the running ones
end, and joins every process before it propagates: no process outlives the call (crops travel
through the pool's pipes; no shared memory is used).

``StreamTiming`` says how much overlapped: seconds cropping (summed over the workers), encoding
(this thread's time in the encoder), the encoder waiting for crops, and the producers waiting on
a full queue.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field

import numpy as np

from imagenet_int8_assets.core.latents.encode import Posterior, PosteriorEncoder, torch_dtype
from imagenet_int8_assets.core.common.parallel import worker_pool
from imagenet_int8_assets.core.crops.preprocess import crop_task

DEFAULT_CHUNK_SIZE = 8
# How long one wait for a chunk lasts before this thread looks again (a dead worker is reported
# by the pool itself; the bound only keeps every wait finite).
POLL_SECONDS = 1.0
# An image of a chunk whose worker died is cropped again alone, in a fresh process each try; it
# fails only when every try dies (one try could be an innocent victim, e.g. of the OOM killer).
ISOLATED_TRIES = 2
WORKER_DIED = (
    f"the crop worker process died while cropping this image, also in {ISOLATED_TRIES} tries alone in a fresh process"
)


@dataclass
class StreamTiming:
    """Where the time of one ``encode_stream`` call went (seconds, wall clock).

    ``crop_s``: time inside ``crop_fn``, summed over the worker processes (it exceeds ``wall_s``
    when several workers crop at once). ``encode_s``: time this thread spent in the encoder (on
    CUDA: copying crops into pinned memory, queuing passes and waiting for results; the GPU also
    works while this thread waits for crops). ``encoder_waited_s``: time this thread waited for
    the next chunk of crops. ``producers_waited_s``: time the queue was full (every slot held
    finished crops not yet consumed), so the workers had nothing to do. ``peak_queued``: the most
    chunks submitted or finished and not yet consumed (never more than ``queue_batches``).
    ``worker_deaths``: crop worker processes that died (a pool counts once); ``isolated_images``:
    images cropped again alone after one did.
    """

    wall_s: float = 0.0
    crop_s: float = 0.0
    encode_s: float = 0.0
    encoder_waited_s: float = 0.0
    producers_waited_s: float = 0.0
    images: int = 0
    chunks: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    queue_batches: int = 0
    peak_queued: int = 0
    workers: int = 0
    worker_deaths: int = 0
    isolated_images: int = 0

    def as_dict(self) -> dict:
        """For metadata: seconds rounded to milliseconds."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class GroupResult:
    """One group (class) of tasks: row r of ``posterior`` (and ``flipped``) is task ``ok[r]``.

    ``ok``: indices into the group's tasks of the images encoded, in order. ``failed``: (index,
    reason) of the images that could not be cropped, in order.
    """

    ok: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    posterior: Posterior | None = None
    flipped: Posterior | None = None


@dataclass
class StreamResult:
    """``groups``: one ``GroupResult`` per group of tasks, in order; ``timing``: the whole call.

    With a single group, ``ok``, ``failed``, ``posterior`` and ``flipped`` are its own.
    """

    groups: list[GroupResult]
    timing: StreamTiming

    def _single(self) -> GroupResult:
        if len(self.groups) != 1:
            raise ValueError(f"{len(self.groups)} groups: use .groups[i]")
        return self.groups[0]

    @property
    def ok(self) -> list[int]:
        return self._single().ok

    @property
    def failed(self) -> list[tuple[int, str]]:
        return self._single().failed

    @property
    def posterior(self) -> Posterior:
        return self._single().posterior

    @property
    def flipped(self) -> Posterior | None:
        return self._single().flipped


def crop_chunk(crop_fn: Callable, tasks: list) -> tuple[np.ndarray | list, list[str | None], float]:
    """Worker entry point: ``crop_fn`` over ``tasks`` -> (the good crops stacked, one reason per
    task (None: cropped), seconds spent)."""
    started = time.perf_counter()
    good, reasons = [], []
    for task in tasks:
        arr, reason = crop_fn(task)
        if arr is None:
            reasons.append(reason or "could not be cropped")
        else:
            good.append(arr)
            reasons.append(None)
    try:
        crops = np.stack(good) if good else []
    except ValueError:  # crops of several sizes: the consumer says so when it encodes them
        crops = good
    return crops, reasons, time.perf_counter() - started


@dataclass
class _Chunk:
    group: int
    lo: int  # first task (index into all tasks)
    hi: int


@dataclass
class _Slot:
    """A submitted chunk: its future, the pool generation that runs it, when it finished."""

    chunk: _Chunk
    future: object
    generation: int
    done_at: float | None = None

    def mark_done(self, _future) -> None:  # runs in the pool's thread
        self.done_at = time.monotonic()


class _WorkerDied(Exception):
    def __init__(self, exitcode: int | None):
        self.exitcode = exitcode
        super().__init__(describe_exit(exitcode))


def describe_exit(exitcode: int | None) -> str:
    """A process's exit status in words: 'exit code 3', 'killed by signal 9 (SIGKILL)'."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "?"
        return f"killed by signal {-exitcode} ({name})"
    return f"exit code {exitcode}"


def _isolated_worker(conn) -> None:
    """A process of its own for images whose worker died: crops one task per message."""
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        crop_fn, task = message
        try:
            out = ("ok", crop_fn(task))
        except BaseException as exc:  # noqa: BLE001 - handed to the parent, which re-raises it
            out = ("error", exc)
        try:
            conn.send(out)
        except Exception as exc:  # an exception or a result that does not pickle
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))


class _Isolated:
    """One spawned process that crops one image at a time, so a death names its image."""

    def __init__(self, ctx):
        self.ctx, self.process, self.conn = ctx, None, None

    def crop(self, crop_fn: Callable, task) -> tuple:
        if self.process is not None and not self.process.is_alive():
            self.close()  # it died between images (killed from outside): start another
        if self.process is None:
            self.conn, child = self.ctx.Pipe()
            self.process = self.ctx.Process(target=_isolated_worker, args=(child,), daemon=True)
            self.process.start()
            child.close()
        try:
            self.conn.send((crop_fn, task))
            while not self.conn.poll(POLL_SECONDS):
                if not self.process.is_alive() and not self.conn.poll(0):
                    raise EOFError
            kind, value = self.conn.recv()
        except (EOFError, OSError):  # the process died (a broken pipe on send, nothing to receive)
            self.process.join(POLL_SECONDS * 5)
            exitcode = self.process.exitcode
            self.close()
            raise _WorkerDied(exitcode) from None
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        if self.process is None:
            return
        try:
            if self.process.is_alive():
                self.conn.send(None)
        except OSError:
            pass
        self.process.join(POLL_SECONDS * 5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.conn.close()
        self.process, self.conn = None, None


class _Producer:
    """The chunks' crops in task order, from a pool that works ahead by at most ``queue_batches``."""

    def __init__(self, crop_fn, tasks, chunks, workers, queue_batches, timing, log):
        self.crop_fn, self.tasks, self.chunks = crop_fn, tasks, chunks
        self.workers, self.queue_batches, self.timing, self.log = workers, queue_batches, timing, log
        self.ctx = multiprocessing.get_context("spawn")
        self.window: deque[_Slot] = deque()
        self.submitted = self.consumed = 0
        self.pool: ProcessPoolExecutor | None = None
        self.generation = 0
        self.old_pools: list[ProcessPoolExecutor] = []
        self.isolated = _Isolated(self.ctx)

    def _new_pool(self) -> None:
        self.pool = worker_pool(self.workers)
        self.generation += 1

    def _fill(self) -> None:
        while len(self.window) < self.queue_batches and self.submitted < len(self.chunks):
            chunk = self.chunks[self.submitted]
            if self.pool is None:
                self._new_pool()
            try:
                future = self.pool.submit(crop_chunk, self.crop_fn, self.tasks[chunk.lo : chunk.hi])
            except BrokenProcessPool:  # it broke since the last look: its chunks are redone alone
                self._broken(self.generation)
                continue
            slot = _Slot(chunk, future, self.generation)
            future.add_done_callback(slot.mark_done)
            self.window.append(slot)
            self.submitted += 1
        self.timing.peak_queued = max(self.timing.peak_queued, len(self.window))

    def _broken(self, generation: int) -> None:
        """The pool of ``generation`` lost a worker: the next chunks go to a fresh pool."""
        if generation != self.generation or self.pool is None:
            return  # already replaced
        self.timing.worker_deaths += 1
        self.old_pools.append(self.pool)  # shut down (joined) at close
        self.pool = None
        self.log(
            "A crop worker process died; the images of its pool's unfinished chunks are cropped again "
            "one at a time in a fresh process, the next chunks go to a fresh pool."
        )

    def next(self) -> tuple[_Chunk, list, list[str | None]]:
        """The next chunk: (chunk, good crops, one reason per task (None: cropped))."""
        chunk = self.chunks[self.consumed]
        if self.workers <= 0:  # in this process: the encoder waits for every crop
            started = time.monotonic()
            crops, reasons, seconds = crop_chunk(self.crop_fn, self.tasks[chunk.lo : chunk.hi])
            self.timing.crop_s += seconds
            self.timing.encoder_waited_s += time.monotonic() - started
            self.consumed += 1
            return chunk, crops, reasons
        self._fill()
        slot = self.window[0]
        started = time.monotonic()
        while not wait_futures([slot.future], timeout=POLL_SECONDS).done:
            pass  # the pool fails the future when a worker dies; the bound keeps each wait finite
        error = slot.future.exception()
        if isinstance(error, BrokenProcessPool):
            self._broken(slot.generation)
            crops, reasons = self._isolate(chunk)
        elif error is not None:
            raise error
        else:
            crops, reasons, seconds = slot.future.result()
            self.timing.crop_s += seconds
        now = time.monotonic()
        self.timing.encoder_waited_s += now - started
        # the queue was full of finished crops: the workers have been idle since the last one finished
        if len(self.window) >= self.queue_batches and self.submitted < len(self.chunks):
            finished = [s.done_at for s in self.window]
            if all(t is not None for t in finished):
                self.timing.producers_waited_s += max(0.0, now - max(finished))
        self.window.popleft()
        self.consumed += 1
        self._fill()  # the freed slot goes back to the workers before this thread encodes
        return chunk, crops, reasons

    def _isolate(self, chunk: _Chunk) -> tuple[list, list[str | None]]:
        """Crop ``chunk``'s tasks one at a time in a process of their own; a death fails its image."""
        good, reasons = [], []
        for index in range(chunk.lo, chunk.hi):
            started = time.perf_counter()
            self.timing.isolated_images += 1
            for attempt in range(1, ISOLATED_TRIES + 1):
                try:
                    arr, reason = self.isolated.crop(self.crop_fn, self.tasks[index])
                    break
                except _WorkerDied as died:
                    self.timing.worker_deaths += 1
                    arr, reason = None, f"{WORKER_DIED} ({died})"
                    self.log(f"task {index}: its crop worker died alone ({died}), try {attempt} of {ISOLATED_TRIES}")
            self.timing.crop_s += time.perf_counter() - started
            if arr is None:
                reasons.append(reason or "could not be cropped")
            else:
                good.append(arr)
                reasons.append(None)
        return good, reasons

    def close(self) -> None:
        """Cancel what has not started, let running chunks end, and join every process."""
        for slot in self.window:
            slot.future.cancel()
        self.window.clear()
        for pool in [*self.old_pools, self.pool]:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self.old_pools, self.pool = [], None
        self.isolated.close()


def _chunks(sizes: Sequence[int], chunk_size: int) -> list[_Chunk]:
    out, lo = [], 0
    for group, size in enumerate(sizes):
        for start in range(lo, lo + size, chunk_size):
            out.append(_Chunk(group, start, min(lo + size, start + chunk_size)))
        lo += size
    return out


def _image_hw(task) -> tuple[int, int] | None:
    """The crop size of a ``CropTask`` (or a tuple of the same fields), when it is one."""
    if isinstance(task, tuple) and len(task) >= 3 and isinstance(task[2], int):
        return task[2], task[2]
    return None


class _GroupWriter:
    """Calls ``on_group`` on a thread of its own, in group order, while the caller encodes the next
    group: writing a class (files, metadata) no longer stalls the encoder between classes. At most
    one encoded group waits for it (the memory bound: its posteriors and whatever the callback
    holds for it). The first error of ``on_group`` is raised in the caller at its next ``put`` or
    at ``close``; groups after it are not written."""

    def __init__(self, on_group: Callable[[int, GroupResult], None]):
        self.on_group = on_group
        self.waiting: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.raised = False
        self.thread = threading.Thread(target=self._work, name="imagenet-int8 group writer", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            item = self.waiting.get()
            if item is None:
                return
            group, result = item
            if self.error is None:
                try:
                    self.on_group(group, result)
                except BaseException as exc:  # raised in the caller's thread
                    self.error = exc
            result.posterior = result.flipped = None

    def _raise(self) -> None:
        if self.error is not None and not self.raised:
            self.raised = True
            raise self.error

    def put(self, group: int, result: GroupResult) -> None:
        self._raise()
        self.waiting.put((group, result))

    def stop(self) -> None:
        """Wait until every group put is written (or skipped after an error); again: nothing."""
        if self.thread.is_alive():
            self.waiting.put(None)
            self.thread.join()

    def close(self) -> None:
        """``stop``, then raise the error of ``on_group``, if any (once)."""
        self.stop()
        self._raise()


def encode_stream(
    vae,
    tasks: Sequence,
    device: str,
    *,
    batch_size: int = 16,
    precision: str = "fp32",
    workers: int = 1,
    flip: bool = False,
    groups: Sequence[int] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    queue_batches: int | None = None,
    crop_fn: Callable = crop_task,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    keep_crops: Callable[[int, list[int], np.ndarray], None] | None = None,
    in_flight: int | None = None,
    on_group: Callable[[int, GroupResult], None] | None = None,
    image_hw: tuple[int, int] | None = None,
) -> StreamResult:
    """Crop ``tasks`` on ``workers`` processes while ``vae`` encodes the crops (see the module).

    ``tasks``: ``CropTask``s (path, recipe, size, max_pixels), or whatever ``crop_fn``
    takes; ``crop_fn(task) -> (uint8 (S, S, 3) array or None, reason)`` must be a module-level
    function (it is pickled to spawned processes). ``groups``: the sizes of consecutive groups of
    ``tasks`` (classes), each encoded on its own as ``encode_posterior`` encodes one class
    (default: one group); the workers crop across group boundaries without stopping.

    ``batch_size``, ``precision``: as ``encode_posterior``. ``flip``: also encode the
    horizontally flipped crops (``flipped``; what ``encode_posterior(..., flip=True)`` gives).
    ``workers``: crop processes (0: crop in this process, nothing overlaps). ``chunk_size``: tasks
    per worker call. ``queue_batches``: chunks submitted or finished and not yet consumed, at
    most (default: twice the workers): the memory bound. ``in_flight``: passes queued ahead on
    the device (``PosteriorEncoder``; default 2 on CUDA, 0 on the CPU).

    ``progress(group, done)``: tasks of the group finished (failed, or encoded with the result on
    the host). ``log``: out-of-memory retries and crop worker deaths. ``keep_crops(group,
    indices, crops)``: each chunk's good crops (uint8 (k, S, S, 3), a fresh array the callback may
    keep) with their indices into the group's tasks, in order, before they are encoded: to store
    the crops without a second pass. ``on_group(group, result)``: called for each group as soon as it is
    encoded, in order, on a writer thread of its own (``_GroupWriter``): while it writes a class,
    the workers crop and the encoder encodes the next one, and at most one more encoded group waits
    for it; every call has returned when ``encode_stream`` returns, and an error it raises is raised
    here. The returned groups then keep their ``ok`` and ``failed`` but not their posteriors
    (``None``), so memory holds a few classes' posteriors at a time instead of all of them.
    ``image_hw``: the crops' (height, width), which gives a group without images its latents' shape
    (0, C, h, w); by default read from the ``CropTask``s, so needed only when there are none.
    """
    tasks = list(tasks)
    sizes = [len(tasks)] if groups is None else [int(n) for n in groups]
    if sum(sizes) != len(tasks) or any(n < 0 for n in sizes):
        raise ValueError(f"group sizes {sizes} do not add up to the {len(tasks)} tasks")
    if chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size} must be >= 1")
    workers = max(0, int(workers))
    chunks = _chunks(sizes, chunk_size)
    workers = min(workers, len(chunks))
    queue_batches = max(1, int(queue_batches) if queue_batches is not None else 2 * max(1, workers))
    timing = StreamTiming(
        images=len(tasks), chunks=len(chunks), chunk_size=chunk_size, queue_batches=queue_batches, workers=workers
    )
    log = log or logging.getLogger(__name__).warning
    started = time.monotonic()
    low = None if precision == "fp32" else vae.cast(torch_dtype(precision))  # shared by every encoder
    producer = _Producer(crop_fn, tasks, chunks, workers, queue_batches, timing, log)
    writer = _GroupWriter(on_group) if on_group is not None else None
    results: list[GroupResult] = []
    try:
        next_chunk, lo = 0, 0
        for group, size in enumerate(sizes):
            result = GroupResult()
            results.append(result)
            report = (lambda n, g=group, r=result: progress(g, n + len(r.failed))) if progress else None
            # an empty group's (0, C, h, w) latents get the crop size of the other groups' tasks
            hw = image_hw or (_image_hw(tasks[lo] if size else tasks[0]) if tasks else None)

            def encoder_for(flipped: bool, report=None, hw=hw) -> PosteriorEncoder:
                return PosteriorEncoder(
                    vae, device, batch_size, precision, flipped, report, log, image_hw=hw, low=low, in_flight=in_flight
                )

            encoder = encoder_for(False, report)
            flip_encoder = encoder_for(True) if flip else None
            while next_chunk < len(chunks) and chunks[next_chunk].group == group:
                chunk, crops, reasons = producer.next()
                next_chunk += 1
                good = []
                for index, reason in zip(range(chunk.lo - lo, chunk.hi - lo), reasons):
                    if reason is None:
                        good.append(index)
                    else:
                        result.failed.append((index, reason))
                if not good:
                    if progress and len(reasons):
                        progress(group, encoder.collected + len(result.failed))
                    continue
                crops = crops if isinstance(crops, np.ndarray) else np.stack(crops)
                if keep_crops is not None:
                    keep_crops(group, good, crops)
                t0 = time.monotonic()
                encoder.add(crops)
                if flip_encoder is not None:
                    flip_encoder.add(crops)
                timing.encode_s += time.monotonic() - t0
                result.ok.extend(good)
                if progress and len(good) < len(reasons):
                    progress(group, encoder.collected + len(result.failed))
            t0 = time.monotonic()
            result.posterior = encoder.finish()
            result.flipped = flip_encoder.finish() if flip_encoder is not None else None
            timing.encode_s += time.monotonic() - t0
            lo += size
            if writer is not None:
                writer.put(group, result)
        if writer is not None:
            writer.close()
    finally:
        producer.close()
        if writer is not None:  # after an error too: the groups already encoded are still written
            writer.stop()
        timing.wall_s = time.monotonic() - started
    return StreamResult(results, timing)
