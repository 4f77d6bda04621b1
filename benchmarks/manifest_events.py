"""The manifest step at ImageNet's class count: what a first build pays per class before any encode.

    python -m benchmarks.manifest_events [--classes 1000] [--images-per-class 2]

Generates ``classes`` class folders of tiny JPEGs, then materializes ``raw_manifest`` twice with the
real definitions in a fresh Dagster instance (SQLite, the shipped dagster.yaml): the first time every
class is new (its partition is registered and its data version observed: one event per class), the
second time nothing changed (no observation). The scan itself is timed alone on the same folder
(``scan_source``, as the pipeline benchmark's reference does), so the step's seconds minus the
scan's are what the step adds per class: the part of a first build's start that grows with the
class count (docs/BENCHMARKS.md, "Prestarted run processes and background writes").
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def make_source(root: Path, classes: int, per_class: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"n{30000000 + c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{c}_{i}.JPEG", quality=90)


def materialize_manifest(job, instance) -> float:
    """raw_manifest's step seconds, from its STEP_SUCCESS event."""
    from dagster import AssetKey, DagsterEventType

    result = job.execute_in_process(instance=instance, asset_selection=[AssetKey("raw_manifest")])
    for event in result.all_events:
        if event.event_type == DagsterEventType.STEP_SUCCESS:
            return event.event_specific_data.duration_ms / 1000
    raise RuntimeError("raw_manifest did not succeed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--images-per-class", type=int, default=2)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-manifest-events-"))
    try:
        source, output = work / "source", work / "out"
        make_source(source, args.classes, args.images_per_class)
        os.environ.update({
            "IMAGENET_INT8_SOURCE": str(source), "IMAGENET_INT8_OUTPUT": str(output), "IMAGENET_INT8_VAE": "tiny-random",
            "IMAGENET_INT8_DEVICE": "cpu", "IMAGENET_INT8_CROP_SIZE": "32", "HF_HUB_OFFLINE": "1",
        })
        from dagster import DagsterInstance

        from imagenet_int8_assets.core.common.parallel import default_workers
        from imagenet_int8_assets.core.source.sources import scan_source
        from imagenet_int8_assets.definitions import build_definitions
        from imagenet_int8_assets.build.instance import prepare_dagster_home
        from imagenet_int8_assets.resources import ImagenetInt8Settings

        t = time.perf_counter()
        scan_source(source, workers=default_workers())
        scan_s = time.perf_counter() - t
        settings = ImagenetInt8Settings.from_env()
        prepare_dagster_home(output / "dagster_home")
        job = build_definitions(settings, 125).resolve_implicit_global_asset_job_def()
        with DagsterInstance.get() as instance:
            first = materialize_manifest(job, instance)
            again = materialize_manifest(job, instance)
        per_class = (first - scan_s) / args.classes
        print(
            f"{args.classes} classes x {args.images_per_class} images: scan alone {scan_s:.2f} s; raw_manifest "
            f"first build {first:.2f} s ({per_class * 1e3:.1f} ms per class beyond the scan: partition registration "
            f"and one observation event per class), nothing changed {again:.2f} s"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
