"""The batched class runs of ``imagenet-int8 build``: several at once, each in a process of its own.

A class run is one partition-range run of crops, latents and shards. The build keeps up to
``runs_at_once`` of them going (default: the number of devices + 1; with only the CPU, 1: the runs
then go one after another in the build's own process, as before). Each encode leases one device
(``core.latents.devices.lease_device``), so with N devices N runs encode at once, one per device, and the
extra run gets ready meanwhile: its process starts (imports, the VAE loaded into host memory), its
run is created (Dagster writes the planned events of its classes), it reads the manifest and waits
for the first device to come free. The first ``runs_at_once`` processes start before the build's
manifest run and get ready while it scans (``ClassRuns.prestart``): the first encode does not wait
for their imports. When a
run's encode ends, the waiting one starts encoding at once, while the finished one writes its
materializations, shards and checks on the CPU. On one GPU that hides the per-run and per-class
bookkeeping behind the next run's encode; on N GPUs it uses them all (before, the CLI ran its
batches one after another; a UI backfill already spread them over the devices).

Why processes: Dagster captures a step's output at the file-descriptor level, so two runs executed
in one process would mix their logs. Each run process dies with the build (``PR_SET_PDEATHSIG``):
a build killed with SIGKILL leaves no run going on, and its unfinished runs, tagged with the
build's process, are failed by the next build or the daemon's sensor (``dead_runs``). A run
process that dies on its own (out of host memory, say) has its run failed by the build at once.

The encode of a run waiting for a device its sibling holds waits for as long as that encode takes
(at least ``SIBLING_DEVICE_WAIT_S``): a run of a CPU build with a full-size VAE can encode for
hours, longer than ``IMAGENET_INT8_DEVICE_WAIT``'s default, which is meant for UI and automation
runs queued behind someone else's.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from imagenet_int8_assets.build.stages import CLASS_STEPS
from imagenet_int8_assets.core.common.parallel import die_with_parent

SIBLING_DEVICE_WAIT_S = 7 * 24 * 3600


# What the build's last run (statistics, dataset, report, probe: executed in the build's own
# process) imports; imported in the background while the class runs encode, so that the build does
# not pay them after the last encode.
DATASET_RUN_IMPORTS = (
    "torch",
    "diffusers",
    "imagenet_int8_assets.reader",
    "imagenet_int8_assets.core.quality.reconstruct",
    "imagenet_int8_assets.core.quality.probe_report",
    "sklearn.decomposition",
    "sklearn.ensemble",
    "sklearn.linear_model",
    "sklearn.metrics",
    "sklearn.model_selection",
    "sklearn.neighbors",
    "sklearn.preprocessing",
    "sklearn.svm",
)


class MissingWarmImport(ImportError):
    """A name in the warm-up list names no module (it moved or was renamed): the list is stale."""


def warm_imports(names: Sequence[str] = DATASET_RUN_IMPORTS) -> threading.Thread:
    """Import ``names`` (and matplotlib on Agg) on a daemon thread; join it before the imports are
    needed.

    A name that is no module at all (a module moved without this list following it) is a bug of
    ours: ``join()`` then raises ``MissingWarmImport`` naming it, so the build's tests fail loudly
    instead of the build silently losing its warm-up. Any other import error is left for the
    module's real import to report where it is used.
    """
    missing: list[str] = []

    def work() -> None:
        import importlib

        from imagenet_int8_assets.core.common.plotting import pyplot

        for name in names:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                    missing.append(name)
            except Exception:
                pass
        try:
            pyplot()
        except Exception:
            pass

    class _Warming(threading.Thread):
        def join(self, timeout: float | None = None) -> None:
            super().join(timeout)
            if missing and not self.is_alive():
                raise MissingWarmImport(
                    f"warm_imports: no module named {', '.join(missing)}; a module moved: update DATASET_RUN_IMPORTS "
                    "in imagenet_int8_assets/build/class_runs.py"
                )

    thread = _Warming(target=work, name="imagenet-int8 warm imports", daemon=True)
    thread.start()
    return thread


def class_batches(order: Sequence[str], todo: Iterable[str], per_run: int) -> list[list[str]]:
    """The build's class runs: the classes of ``todo``, each in exactly one run, in the instance's
    partition ``order`` (``partitions.partition_order``: registration order, not sorted).

    A run selects its classes as a partition range, first .. last in ``order``, and that range
    covers every class between them: so a run is a stretch of consecutive classes of ``order``
    that are all in ``todo`` (a class that is up to date, vanished or another output's, sitting
    between two to build, ends one stretch and starts the next) of at most ``per_run`` classes.
    Classes of ``todo`` that are not in ``order`` (not registered) are left out. In a build of
    more than two full runs the first and the last runs are small (``edge_size``): runs overlap
    only in the middle (before the first encode nothing else runs, its run's planned events are
    written first; after the last encode its bookkeeping is all that is left), so small edge runs
    keep both short."""
    wanted = set(todo)
    stretches: list[list[str]] = [[]]
    for key in order:
        if key in wanted:
            stretches[-1].append(key)
        elif stretches[-1]:
            stretches.append([])
    stretches = [s for s in stretches if s]
    total = sum(len(s) for s in stretches)
    first: list[list[str]] = []
    last: list[list[str]] = []
    if total > 2 * per_run:  # the first and the last few classes become runs of their own
        first = _take(stretches, edge_size(per_run), from_end=False)
        last = _take(stretches, edge_size(per_run), from_end=True)
    middle = [stretch[i : i + per_run] for stretch in stretches for i in range(0, len(stretch), per_run)]
    return [*first, *middle, *last]


def _take(stretches: list[list[str]], count: int, from_end: bool) -> list[list[str]]:
    """Remove ``count`` classes from the start (or the end) of ``stretches``; returns them as runs
    (one per stretch they came from, in order)."""
    taken: list[list[str]] = []
    while count and stretches:
        stretch = stretches[-1] if from_end else stretches[0]
        n = min(count, len(stretch))
        part = stretch[len(stretch) - n :] if from_end else stretch[:n]
        taken.append(part)
        if n == len(stretch):
            stretches.pop(-1 if from_end else 0)
        elif from_end:
            del stretch[len(stretch) - n :]
        else:
            del stretch[:n]
        count -= n
    return taken[::-1] if from_end else taken


def edge_size(per_run: int) -> int:
    """Classes in the first and the last class run: an eighth of a full run (16 of 125), long
    enough on a GPU for the next run to get ready while it encodes."""
    return max(1, -(-per_run // 8))


def default_runs_at_once(settings) -> int:
    """One run per device plus one that gets ready while they encode; 1 (the runs one after another,
    in the build's process) when the only device is the CPU: there the encode uses the cores that
    the overlapped bookkeeping would use, and a process per run costs its imports (measured: 5
    one-class runs 49.9 s at once against 51.3 s one at a time, on 2 cores)."""
    from imagenet_int8_assets.core.latents.devices import DeviceSettingError, visible_devices

    try:
        devices = visible_devices(settings.devices or None, settings.device)
    except DeviceSettingError:  # the runs fail with the message; one at a time is enough for that
        return 1
    return 1 if devices == ["cpu"] else len(devices) + 1


# A run process once ready (dagster, torch, diffusers and streaming imported, the build's job built)
# holds about 0.88 GiB with tiny-random and 1.19 GiB with sdxl-random: the VAE's fp32 weights come
# on top of the rest (measured on this project's CPU machine, torch 2.13, dagster 1.13.27).
RUN_PROCESS_BASE_BYTES = 900 * 2**20
MEMORY_SHARE = 0.8  # of the memory available when the build starts, for its run processes


def available_memory() -> int | None:
    """Bytes of memory available to new processes (``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_process_bytes(settings) -> int:
    """About how much memory one ready run process holds: the imports and its VAE's weights."""
    from imagenet_int8_assets.core.latents.vae import weights_host_bytes

    weights = weights_host_bytes(settings.vae)
    if settings.vae_fallback:  # a fallback is loaded when the real weights are not there
        weights = max(weights, weights_host_bytes(settings.vae_fallback))
    return RUN_PROCESS_BASE_BYTES + weights


def runs_at_once_limit(settings, requested: int, batches: int) -> tuple[int, str | None]:
    """How many run processes to keep going: ``requested``, but no more than there are ``batches``
    (a process without a run holds a VAE for nothing) and no more than the memory available holds
    (each holds its VAE); at least 1. Returns it and, when memory lowered it, a line saying so."""
    limit = max(1, min(requested, batches))
    available, each = available_memory(), run_process_bytes(settings)
    if available is None:
        return limit, None
    fits = max(1, int(available * MEMORY_SHARE // each))
    if fits >= limit:
        return limit, None
    return fits, (
        f"Class runs at once: {fits} instead of {limit}: each run process holds its VAE in memory (about "
        f"{each / 2**30:.1f} GiB), and {available / 2**30:.1f} GiB are available. Free memory or lower "
        "--runs-at-once to silence this."
    )


def expected_batches(settings, per_run: int) -> int:
    """The class runs a build of every class folder of the source would make (before the scan:
    how many run processes are worth starting early); 1 when the source cannot be listed yet."""
    from imagenet_int8_assets.core.source.sources import SourceError, find_class_folders, resolve_source_root

    try:
        names = find_class_folders(resolve_source_root(settings.source_path())).names
    except (SourceError, OSError):
        return 1
    return max(1, len(class_batches(names, names, per_run)))


def run_process(parent_pid: int, per_run: int, env: dict, work: multiprocessing.connection.Connection) -> None:
    """A run process: get ready (imports, the build's job, the instance, the VAE loaded into host
    memory), then execute the one run it is given on ``work`` (selection, tags, run id, run config)
    and exit 0 if it succeeded, else 1. Given nothing (the pipe closed or ``None``: the build needs
    no more runs) it exits 0 without a run.

    The build starts its first run processes before its manifest run, so that they get ready while
    the source is scanned; the later ones are handed their run at once. It ends with ``os._exit``
    after flushing, as the command does (``cli.run``: pyarrow can abort in interpreter teardown)."""
    die_with_parent(parent_pid)
    os.environ.update(env)
    code = 1
    try:
        from dagster import AssetKey, DagsterInstance

        from imagenet_int8_assets.assets.latents import preload_vae
        from imagenet_int8_assets.definitions import build_definitions
        from imagenet_int8_assets.resources import ImagenetInt8Settings

        settings = ImagenetInt8Settings.from_env()
        job = build_definitions(settings, per_run).resolve_implicit_global_asset_job_def()
        preload_vae(settings)
        try:
            given = work.recv()
        except EOFError:
            given = None
        if given is None:
            code = 0
            return
        selection, tags, run_id, run_config = given
        with DagsterInstance.get() as instance:
            result = job.execute_in_process(
                run_config=run_config,
                instance=instance,
                asset_selection=[AssetKey(k) for k in selection],
                tags=tags,
                run_id=run_id,
                raise_on_error=False,
            )
        code = 0 if result.success else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


@dataclass
class _Ready:
    """A run process started before it has a run: it gets ready meanwhile."""

    process: multiprocessing.process.BaseProcess
    work: multiprocessing.connection.Connection


@dataclass
class _Active:
    batch: list[str]
    run_id: str
    process: multiprocessing.process.BaseProcess
    progress: object


class ClassRuns:
    """Executes the class batches, ``runs_at_once`` at a time, in batch order; ``progress(run_id)``
    is a context manager that follows one run (the CLI's bar), ``describe(done, running, total)``
    is told the state after every change."""

    def __init__(
        self,
        instance,
        settings,
        per_run: int,
        runs_at_once: int,
        run_config: dict,
        tags: dict[str, str],
        progress: Callable[[str], object],
        describe: Callable[[int, int, int], None] = lambda done, running, total: None,
    ):
        self.instance, self.settings, self.per_run, self.runs_at_once = instance, settings, per_run, runs_at_once
        self.run_config, self.tags, self.progress, self.describe = run_config, tags, progress, describe
        self.env = {"IMAGENET_INT8_DEVICE_WAIT": str(max(settings.device_wait, SIBLING_DEVICE_WAIT_S))}
        self.context = multiprocessing.get_context("spawn")
        self.ready: list[_Ready] = []

    def _spawn(self) -> _Ready:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=run_process, args=(os.getpid(), self.per_run, self.env, receive), name="imagenet-int8 run process"
        )
        process.start()  # from this (the main) thread: the death signal follows the thread that forked
        receive.close()
        return _Ready(process, send)

    def prestart(self, count: int) -> None:
        """Start ``count`` run processes now, before the runs are known (the build calls this before
        its manifest run): their imports and VAE load overlap with the scan. ``run`` uses them first;
        ``close`` ends those it did not use."""
        while len(self.ready) < count:
            self.ready.append(self._spawn())

    def close(self, keep: int = 0) -> None:
        """End the started run processes that were given no run, but the first ``keep`` (they hold
        no run, lease or file being written: only imports and a VAE in memory)."""
        for ready in self.ready[keep:]:
            ready.work.close()
            ready.process.kill()
            ready.process.join()
        self.ready = self.ready[:keep]

    def _start(self, batch: list[str]) -> _Active:
        from dagster._core.utils import make_new_run_id

        run_id = make_new_run_id()
        tags = {
            **self.tags,
            "dagster/asset_partition_range_start": batch[0],
            "dagster/asset_partition_range_end": batch[-1],
        }
        ready = self.ready.pop(0) if self.ready else self._spawn()
        try:
            ready.work.send((CLASS_STEPS, tags, run_id, self.run_config))
        except OSError:  # the process died getting ready: _finish reports it (no run was created)
            pass
        ready.work.close()
        progress = self.progress(run_id)
        progress.__enter__()
        return _Active(batch, run_id, ready.process, progress)

    def _finish(self, active: _Active) -> list[str]:
        from dagster import DagsterEventType, DagsterRunStatus

        from imagenet_int8_assets.build.run_events import failure_lines, run_failure_block
        from imagenet_int8_assets.build.dead_runs import fail_run

        active.process.join()
        active.progress.__exit__(None, None, None)
        code = active.process.exitcode
        run = self.instance.get_run_by_id(active.run_id)
        if run is None:
            return run_failure_block(active.run_id, [f"its process exited with code {code} before the run was created"], False)
        problems = []
        if run.status not in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
            how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            message = (
                f"The process that executed this run (classes {active.batch[0]} .. {active.batch[-1]}) ended with "
                f"{how} before the run finished (out of host memory?); run the build again to redo its classes."
            )
            fail_run(self.instance, run, message)
            problems.append(message)
        logs = self.instance.all_logs(
            active.run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.ASSET_CHECK_EVALUATION}
        )
        problems += failure_lines(entry.dagster_event for entry in logs)
        succeeded = self.instance.get_run_by_id(active.run_id).status == DagsterRunStatus.SUCCESS
        return run_failure_block(active.run_id, problems, succeeded)

    def run(self, batches: Sequence[list[str]]) -> list[str]:
        """Execute every batch; returns the failure lines (empty when every run succeeded)."""
        self.close(keep=min(self.runs_at_once, len(batches)))  # no process waits for a run it will not get
        pending, active, failures, done = list(batches), [], [], 0
        try:
            while pending or active:
                while pending and len(active) < self.runs_at_once:
                    active.append(self._start(pending.pop(0)))
                self.describe(done, len(active), len(batches))
                multiprocessing.connection.wait([a.process.sentinel for a in active])
                for ended in [a for a in active if not a.process.is_alive()]:
                    active.remove(ended)
                    failures += self._finish(ended)
                    done += 1
        finally:
            for left in active:  # interrupted: no run outlives the build
                left.process.kill()
                left.process.join()
                left.progress.__exit__(None, None, None)
        return failures
