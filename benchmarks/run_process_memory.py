"""What one ready run process of `imagenet-int8 build` holds in memory, against the estimate the build
uses to bound ``--runs-at-once`` (``class_runs.run_process_bytes``).

    python -m benchmarks.run_process_memory [--vae tiny-random sdxl-random] [--json memory.json]

For each VAE: starts one run process exactly as the build does (``ClassRuns.prestart``: imports,
the build's job, the VAE loaded into host memory), samples its resident memory (VmRSS) until it has
not grown for 15 s, then ends it unused. Reports the steady RSS, the estimate, and their ratio (an
estimate below 1.0x of the real figure would let a build start more processes than memory holds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(vae: str, work: Path, settle_s: float = 15.0, timeout_s: float = 600.0) -> dict:
    """One ready run process of a build with ``vae``: its steady RSS and the build's estimate."""
    import dagster as dg

    from imagenet_int8_assets.build.class_runs import ClassRuns, run_process_bytes
    from imagenet_int8_assets.build.instance import prepare_dagster_home
    from imagenet_int8_assets.resources import ImagenetInt8Settings

    out = work / vae
    os.environ.update(IMAGENET_INT8_OUTPUT=str(out), IMAGENET_INT8_VAE=vae, IMAGENET_INT8_DEVICE="cpu")
    settings = ImagenetInt8Settings.from_env()
    prepare_dagster_home(out / "dagster_home")
    with dg.DagsterInstance.get() as instance:
        runs = ClassRuns(instance, settings, 1, 1, {}, {}, progress=lambda run_id: None)
        runs.prestart(1)
        pid = runs.ready[0].process.pid
        started = last_growth = time.monotonic()
        steady = 0
        while time.monotonic() - last_growth < settle_s and time.monotonic() - started < timeout_s:
            time.sleep(0.5)
            now = rss_bytes(pid) or 0
            if now > steady:
                steady, last_growth = now, time.monotonic()
        runs.close()
    estimate = run_process_bytes(settings)
    return {
        "vae": vae, "rss_bytes": steady, "estimate_bytes": estimate, "estimate_over_rss": round(estimate / steady, 3),
        "ready_after_s": round(last_growth - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", nargs="+", default=["tiny-random", "sdxl-random"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="run-process-memory-") as tmp:
        results = [measure(vae, Path(tmp)) for vae in args.vae]
    for r in results:
        print(
            f"{r['vae']:>14}: ready run process {r['rss_bytes'] / 2**30:.2f} GiB RSS (steady after {r['ready_after_s']} s), "
            f"estimate {r['estimate_bytes'] / 2**30:.2f} GiB = {r['estimate_over_rss']}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # the spawned run processes import this module as __mp_main__: keep it guarded
    sys.exit(main())
