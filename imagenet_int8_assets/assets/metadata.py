"""Small helpers that turn results into Dagster metadata (markdown tables, progress logs)."""

from __future__ import annotations

import time
from collections.abc import Callable

from imagenet_int8_assets.core.tables import markdown_table  # noqa: F401 (the assets' table helper)

GROUP = "imagenet_int8"


def progress_logger(
    log: Callable[[str], None], label: str, total: int | None = None, every_s: float = 10.0
):
    """A ``progress(done[, total])`` callback logging ``label: done/total (rate)`` every ``every_s``."""
    start = last = time.monotonic()
    fixed_total = total

    def progress(done: int, total: int | None = None) -> None:
        nonlocal last
        total = fixed_total if total is None else total
        now = time.monotonic()
        if done < total and now - last < every_s:
            return
        last = now
        rate = done / max(now - start, 1e-9)
        log(f"{label}: {done}/{total} ({rate:.1f}/s)")

    return progress
