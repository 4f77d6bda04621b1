"""Process-pool mapping shared by the manifest scan and the crop step."""

from __future__ import annotations

import multiprocessing
import os
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
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield from pool.map(fn, items, chunksize=chunksize)
