"""Disk full: the one place that turns "No space left on device" into a message a user can act on.

Every step that writes under the output wraps its work in ``disk_full_guard(step, output)``.
When the disk (or quota) fills, the step fails with a ``dagster.Failure`` saying which step (and
class) it was, how much space the rest of the step needs (from the bytes per image measured so
far), how much is free, and that running the same build again after freeing space completes it:
every write is atomic (see ``core.common.files``), so a full disk leaves the previous version or
nothing, never a half-written file under its real name.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What SQLite says when it cannot grow its file or journal (the CLI's Dagster instance).
SQLITE_DISK_ERRORS = ("database or disk is full", "disk i/o error")
# numpy's ndarray.tofile (np.save) reports a full disk as a short write, without an errno.
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as disk sizes are sold)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def disk_full_error(exc: BaseException | None) -> BaseException | None:
    """The disk-full error in ``exc``'s chain (an ENOSPC/EDQUOT ``OSError``, numpy's short write, or
    SQLite's "database or disk is full" / "disk I/O error"), or None when the failure has another cause."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (
            exc.errno in DISK_FULL_ERRNOS or (exc.errno is None and SHORT_WRITE.fullmatch(str(exc)))
        ):
            return exc
        if isinstance(exc, sqlite3.Error) and any(m in str(exc).lower() for m in SQLITE_DISK_ERRORS):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


class SpaceNeeds:
    """What a step has written so far, to say what the rest needs when the disk fills.

    Call ``writing(items, nbytes, partition)`` right before each write (a class's crops, a
    report); each call marks the previous write as done. ``total_items`` is how many items (images)
    the step writes in this run, or None for a step that writes one payload.
    """

    def __init__(self, step: str, output: Path, total_items: int | None = None):
        self.step, self.output, self.total_items = step, Path(output), total_items
        self.done_items = self.done_bytes = 0
        self.pending: tuple[int, int, str | None] | None = None

    def writing(self, items: int, nbytes: int, partition: str | None = None) -> None:
        if self.pending is not None:
            self.done_items += self.pending[0]
            self.done_bytes += self.pending[1]
        self.pending = (int(items), int(nbytes), partition)

    def estimate(self) -> str:
        """How much space the rest of the step needs, and from what."""
        items, nbytes, _ = self.pending or (0, 0, None)
        if self.total_items is None:
            return f"This step writes about {human_bytes(nbytes)}." if nbytes else ""
        remaining = max(self.total_items - self.done_items, 0)
        if self.done_items:
            per, measured = self.done_bytes / self.done_items, "measured so far"
        elif items:
            per, measured = nbytes / items, "of the write that failed"
        else:
            return ""
        return (
            f"The rest of this step needs about {human_bytes(per * remaining)} "
            f"({remaining} image(s) x {human_bytes(per)} per image, {measured})."
        )

    @contextmanager
    def guard(self) -> Iterator[SpaceNeeds]:
        """A full disk inside this block becomes a ``dagster.Failure`` with ``message``."""
        try:
            yield self
        except Exception as exc:
            error = disk_full_error(exc)
            if error is None:
                raise
            from dagster import Failure

            raise Failure(description=self.message(error), allow_retries=False) from None

    def message(self, error: BaseException) -> str:
        partition = self.pending[2] if self.pending else None
        where = f"{self.step}" + (f" (class {partition})" if partition else "")
        reason = getattr(error, "strerror", None) or str(error)
        if SHORT_WRITE.fullmatch(str(error)):
            reason = f"{os.strerror(errno.ENOSPC)} ({error})"
        filename = getattr(error, "filename", None)
        free = free_bytes(self.output)
        parts = [
            f"Disk full while writing {where} under {self.output}: {reason}"
            + (f" ({filename})" if filename else "") + ".",
            self.estimate(),
            f"{human_bytes(free)} free now." if free is not None else "",
            "Free space and run the same build again: it completes the build (a full disk leaves no "
            "half-written file behind).",
        ]
        return " ".join(p for p in parts if p)


@contextmanager
def disk_full_guard(step: str, output: Path, total_items: int | None = None) -> Iterator[SpaceNeeds]:
    """Run a step's writes; a full disk becomes a ``dagster.Failure`` with ``SpaceNeeds.message``.

    For a loop that should guard only its writes, make one ``SpaceNeeds`` and wrap each write in
    ``with needs.guard():`` instead.
    """
    needs = SpaceNeeds(step, output, total_items)
    with needs.guard():
        yield needs
