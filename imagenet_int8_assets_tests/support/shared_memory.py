"""Test support: StreamingDataset's shared memory, cleaned up between tests (see conftest's
``own_tmpdir`` and ``own_shared_memory_per_module``)."""

from __future__ import annotations

import contextlib
import gc
import os
import re
from pathlib import Path


def release_streaming_segments(before: set[str], ours: Path) -> None:
    """Unlink the StreamingDataset segments created since ``before`` (a ``streaming_segments()``)
    except another pytest process's, and close the unlinked ones this process still holds when it
    holds many descriptors.

    /dev/shm is the whole machine's: the suite's other workers (pytest-xdist) create segments while
    this test runs, and unlinking one of theirs would pull it from under their datasets (a
    DataLoader worker then finds ``/000004_locals`` gone). Whose a segment is cannot be told from
    who holds it: every new StreamingDataset attaches to all the existing ones while it looks for a
    free prefix. It is told from the dataset's registration, ``NNNNNN_locals``, which lists the
    dataset's local folders: a prefix whose folders all lie under another pytest process's temp
    root (``/tmp/pytest-of-<user>/...``, not under ``ours``, this process's ``getbasetemp()``) is
    theirs and kept; every other new one is this test's garbage once the test ends."""
    new = streaming_segments() - before
    ours = Path(ours).resolve()
    pytest_root = next((p for p in ours.parents if p.name.startswith("pytest-of-")), None)
    by_prefix: dict[str, list[str]] = {}
    for name in new:
        by_prefix.setdefault(name[:6], []).append(name)
    garbage = []
    for prefix, names in by_prefix.items():
        folders = registered_folders(prefix)
        if pytest_root and folders and all(_under(f, pytest_root) and not _under(f, ours) for f in folders):
            continue  # another pytest process's dataset
        garbage += names
    if not garbage:  # most tests open no dataset: no collection (a gc pass costs 0.3 s or more in a worker)
        return
    gc.collect()
    for name in garbage:
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{name}")
    close_unlinked_streaming_memory()


def registered_folders(prefix: str) -> list[Path]:
    """The local folders that the StreamingDataset registered under ``prefix`` lists in its
    ``NNNNNN_locals`` segment (an int32 byte count, then the folders and the prefix joined by NUL);
    [] when there is no such segment or it cannot be read."""
    try:
        data = Path(f"/dev/shm/{prefix}_locals").read_bytes()
        size = int.from_bytes(data[:4], "little", signed=True)
        return [Path(f) for f in data[4:size].decode("utf-8").split("\0")[:-1] if f]
    except (OSError, UnicodeDecodeError, ValueError):
        return []


def _under(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except OSError:
        return False


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
