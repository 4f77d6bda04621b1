"""Facts about the machine a benchmark ran on (one place for every benchmark's JSON and report)."""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any


def package_version(name: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    """The CPU model name from /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU model, else what ``platform`` says, for a report line."""
    return cpu_model() or platform.processor() or "unknown CPU"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded (None where the platform has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def orchestration_facts() -> dict[str, Any]:
    """What the Dagster-side benchmarks record: date, CPUs, platform, Python, dagster, torch, load."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "dagster": package_version("dagster"),
        "torch": package_version("torch"),
        "load_average_at_start": load_average(),
    }


def work_folder(out: str | None, prefix: str, error) -> tuple[Path, bool]:
    """A benchmark's work folder and whether to remove it afterwards: ``out`` (``--out``, which
    must be empty or missing; kept) or a new temporary folder (removed). ``error`` is
    ``parser.error``."""
    if out:
        work = Path(out).resolve()
        if work.exists() and any(work.iterdir()):
            error(f"--out {work} must be empty or missing")
        work.mkdir(parents=True, exist_ok=True)
        return work, False
    return Path(tempfile.mkdtemp(prefix=prefix)), True
