"""Test support: StreamingDataset's shared memory, cleaned up between tests (see conftest's
``own_tmpdir`` and ``own_shared_memory_per_module``)."""

from __future__ import annotations

import contextlib
import gc
import os
import re


def release_streaming_segments(before: set[str]) -> None:
    """Unlink the StreamingDataset segments created since ``before`` (a ``streaming_segments()``)
    and close the unlinked ones this process still holds when it holds many descriptors."""
    gc.collect()
    for name in streaming_segments() - before:
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{name}")
    close_unlinked_streaming_memory()


def close_unlinked_streaming_memory(threshold: int = 256) -> None:
    """StreamingDataset's shared-memory objects are kept alive by an atexit handler, each holding a
    descriptor (also those it only opened to look for a free prefix). Once their segments are
    unlinked they serve nobody: close them when this process holds many descriptors, so a long
    test session never runs out ("Too many open files")."""
    try:
        if len(os.listdir("/proc/self/fd")) < threshold:
            return
    except OSError:
        return
    from streaming.base.shared.memory import SharedMemory as StreamingSharedMemory

    for obj in gc.get_objects():
        if isinstance(obj, StreamingSharedMemory):
            shm = getattr(obj, "shm", None)
            if shm is not None and not os.path.exists(f"/dev/shm/{shm.name.lstrip('/')}"):
                with contextlib.suppress(Exception):  # a buffer still exported stays open
                    shm.close()


def streaming_segments() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if STREAMING_SEGMENT.match(n)}
    except OSError:  # no /dev/shm on this platform
        return set()


STREAMING_SEGMENT = re.compile(r"\d{6}_")
