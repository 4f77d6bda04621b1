"""Small helpers that turn results into Dagster metadata (markdown tables, progress logs)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

GROUP = "imagenet_int8"


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub-style markdown table of ``rows`` (dicts), in ``columns`` order."""
    if not rows:
        return "_(no rows)_"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


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
