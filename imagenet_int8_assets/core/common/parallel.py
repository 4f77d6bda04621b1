"""Process-pool mapping shared by the manifest scan and the crop step."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Below this many items a pool costs more to start than it saves.
MIN_ITEMS_FOR_POOL = 64


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the one that started it dies (Linux; elsewhere nothing), and exit
    at once if it is gone already. For the processes a run starts (crop and scan workers, the build's
    run processes): killed with SIGKILL, a parent cannot shut its pool down, and pool workers wait on
    their task queue forever (seen: scan workers of a killed process still asleep 40 minutes later).
    Set from the process's first code; the signal follows the parent's thread that started it, so
    pools are started from a thread that lives as long as they do (the step's)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that die with this one (``die_with_parent``)."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    )


def map_ordered(
    fn: Callable[[T], R], items: Iterable[T], workers: int, chunksize: int = 16
) -> Iterator[R]:
    """``map(fn, items)`` in order, on ``workers`` processes when that pays off.

    Uses the ``spawn`` start method: the caller may be a multi-threaded process (a Dagster run
    worker), where ``fork`` can deadlock. ``fn`` must be a module-level function.
    """
    items = list(items)
    if workers <= 1 or len(items) < MIN_ITEMS_FOR_POOL:
        yield from map(fn, items)
        return
    with worker_pool(workers) as pool:
        yield from pool.map(fn, items, chunksize=chunksize)
