"""The rescan of an ImageNet-size source with and without ctime and inode, against a content hash.

Run from the repository root::

    python -m benchmarks.rescan                      # defaults: 1,281,167 files in 1,000 classes, 3 repeats
    python -m benchmarks.rescan --json rescan.json   # also write the results as JSON

What is measured (seconds of wall time, min and median of ``--repeats``, the variants alternating so
a change of load on the machine hits them alike):

1. The rescan of an unchanged source: ``scan_source(source, previous=manifest)``, every file's row
   reused (one ``stat`` each, no decoding), on a listing of ImageNet's size: ``--files`` empty files
   in ``--classes`` class folders (a rescan of unchanged files reads none of their bytes, so their
   size does not matter; empty files make the listing quick to create and cost no disk blocks).
   **reference**: ``scan_source`` of ``--reference`` (the commit before ctime and inode were
   recorded, loaded from git), with its own manifest (no ctime, inode or change columns);
   **with ctime and inode**: this checkout's ``scan_source`` with its own manifest (comparing four
   stat fields, carrying three more columns); **upgrade**: this checkout's ``scan_source`` with the
   reference's manifest (the first scan after an upgrade, which records ctime and inode).
2. The manifest itself, both formats: parquet bytes, ``to_parquet`` and ``read_parquet`` seconds,
   and ``class_data_versions`` (reference and this checkout).
3. A content hash instead: sha256 over real JPEG bytes (``--jpeg-files`` synthetic 500x375 photos
   at quality 90, hashed from memory, so this is the CPU's part alone), projected to ImageNet's
   ~140 GB (``--dataset-gb``); every rescan would also have to read those bytes from storage.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import orchestration_facts, work_folder

REPO = Path(__file__).resolve().parent.parent
REFERENCE_REVISION = "3486ead"  # the last commit whose manifest has no ctime, inode or change columns
IMAGENET_FILES = 1_281_167


def make_listing(root: Path, classes: int, files: int) -> Path:
    """``files`` empty files spread over ``classes`` class folders named like ImageNet's."""
    per = -(-files // classes)
    made = 0
    for c in range(classes):
        name = f"n{10000000 + c:08d}"
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(min(per, files - made)):
            with open(folder / f"{name}_{i}.JPEG", "wb"):
                pass
        made += min(per, files - made)
    return root


def load_reference(revision: str, work: Path):
    """``imagenet_int8_assets/core/sources.py`` as it was at ``revision``, as a module."""
    text = subprocess.run(
        ["git", "show", f"{revision}:imagenet_int8_assets/core/sources.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    path = work / f"sources_{revision}.py"
    path.write_text(text)
    shutil.copy(REPO / "imagenet_int8_assets" / "core" / "imagenet_classes.tsv", work)  # read beside the module
    spec = importlib.util.spec_from_file_location(f"sources_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def summary(seconds: list[float]) -> dict[str, Any]:
    return {"seconds": [round(s, 2) for s in seconds], "min": round(min(seconds), 2),
            "median": round(statistics.median(seconds), 2)}


def manifest_costs(frame, versions_fn, labels, repeats: int) -> dict[str, Any]:
    import pandas as pd

    def write() -> bytes:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return buffer.getvalue()

    writes, reads, versions = [], [], []
    data = b""
    for _ in range(repeats):
        seconds, data = timed(write)
        writes.append(seconds)
        reads.append(timed(lambda blob=data: pd.read_parquet(io.BytesIO(blob)))[0])
        versions.append(timed(lambda: versions_fn(frame, labels))[0])
    return {"columns": list(frame.columns), "parquet_bytes": len(data), "to_parquet": summary(writes),
            "read_parquet": summary(reads), "class_data_versions": summary(versions)}


def jpeg_hash_rate(count: int, repeats: int) -> dict[str, Any]:
    """sha256 throughput (bytes/s, one core) over real JPEG bytes held in memory."""
    from imagenet_int8_assets.sample import synthetic_picture

    blobs = []
    for i in range(count):
        buffer = io.BytesIO()
        size = (500, 375) if i % 2 == 0 else (375, 500)
        synthetic_picture(*size, (40 + 7 * i % 200, 90, 120), seed=i).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    total = sum(map(len, blobs))
    rates = []
    for _ in range(repeats):
        seconds = timed(lambda: [hashlib.sha256(b).digest() for b in blobs])[0]
        rates.append(total / seconds)
    return {"files": count, "bytes": total, "mean_file_bytes": total // count, "rates": [round(r) for r in rates],
            "bytes_per_second_max": round(max(rates)), "bytes_per_second_median": round(statistics.median(rates))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--files", type=int, default=IMAGENET_FILES, help="files in the listing (default 1,281,167)")
    add("--classes", type=int, default=1000, help="class folders (default 1000)")
    add("--repeats", type=int, default=3, help="timings of each variant (default 3)")
    add("--reference", default=REFERENCE_REVISION, help=f"git revision of the reference (default {REFERENCE_REVISION})")
    add("--jpeg-files", type=int, default=200, help="JPEGs hashed for the content-hash rate (default 200)")
    add("--dataset-gb", type=float, default=140.0, help="source bytes a content hash reads (default 140 GB)")
    parser.add_argument("--out", help="work folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)

    from imagenet_int8_assets.core.source import sources

    work, cleanup = work_folder(args.out, "bench-rescan-", parser.error)
    facts = orchestration_facts()
    try:
        reference = load_reference(args.reference, work)
        start = time.perf_counter()
        root = make_listing(work / "listing", args.classes, args.files)
        listing_s = time.perf_counter() - start
        workers = min(os.cpu_count() or 1, 16)
        # the first scan probes every file on worker processes, which import this checkout's module (not
        # the reference's): the reference's manifest is its rows without the new columns
        first_s, (new_manifest, labels) = timed(lambda: sources.scan_source(root, workers=workers))
        old_manifest = new_manifest[reference.MANIFEST_COLUMNS].copy()
        assert list(old_manifest.columns) == reference.MANIFEST_COLUMNS
        assert len(old_manifest) == len(new_manifest) == args.files
        variants = {
            "reference": lambda: reference.scan_source(root, previous=old_manifest),
            "with_ctime_inode": lambda: sources.scan_source(root, previous=new_manifest),
            "upgrade": lambda: sources.scan_source(root, previous=old_manifest),
        }
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, scan in variants.items():
                took, (frame, _) = timed(scan)
                assert frame.attrs["reused_rows"] == args.files, (name, frame.attrs)
                seconds[name].append(took)
                del frame
        rescans = {name: summary(values) for name, values in seconds.items()}
        for name in ("with_ctime_inode", "upgrade"):
            rescans[name]["vs_reference_median"] = round(
                rescans[name]["median"] / rescans["reference"]["median"], 3
            )
        manifests = {
            "reference": manifest_costs(old_manifest, reference.class_data_versions, labels, args.repeats),
            "with_ctime_inode": manifest_costs(new_manifest, sources.class_data_versions, labels, args.repeats),
        }
    finally:
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)
    rate = jpeg_hash_rate(args.jpeg_files, args.repeats)
    dataset_bytes = args.dataset_gb * 1e9
    content_hash = {
        **rate,
        "dataset_gb": args.dataset_gb,
        "cpu_seconds_one_core": round(dataset_bytes / rate["bytes_per_second_max"], 1),
        "cpu_seconds_16_cores": round(dataset_bytes / rate["bytes_per_second_max"] / 16, 1),
        "read_seconds_at_1_gb_s": round(dataset_bytes / 1e9, 1),
    }
    result = {
        "machine": facts, "files": args.files, "classes": args.classes, "repeats": args.repeats,
        "reference": args.reference, "listing_seconds": round(listing_s, 1), "first_scan_seconds": round(first_s, 1),
        "scan_workers": workers, "rescans": rescans, "manifests": manifests, "content_hash": content_hash,
    }
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def print_report(r: dict[str, Any]) -> None:
    print("Machine: " + ", ".join(f"{k}={v}" for k, v in r["machine"].items()))
    print(f"\n{r['files']:,} files in {r['classes']:,} class folders (listing made in {r['listing_seconds']} s; "
          f"first scan {r['first_scan_seconds']} s on {r['scan_workers']} workers)")
    print(f"\nRescan of the unchanged source, {r['repeats']} repeats:")
    print(f"{'':<40}{'min s':>8}{'median s':>10}{'vs ref':>8}")
    for name, label in (("reference", f"reference ({r['reference']})"), ("with_ctime_inode", "with ctime and inode"),
                        ("upgrade", "first scan after an upgrade")):
        s = r["rescans"][name]
        ratio = f"{s['vs_reference_median']:.3f}x" if "vs_reference_median" in s else ""
        print(f"{label:<40}{s['min']:>8.2f}{s['median']:>10.2f}{ratio:>8}")
    print("\nThe manifest (min s):")
    print(f"{'':<24}{'parquet MB':>11}{'to_parquet':>11}{'read':>8}{'versions':>10}")
    for name, m in r["manifests"].items():
        print(f"{name:<24}{m['parquet_bytes'] / 1e6:>11.1f}{m['to_parquet']['min']:>11.2f}"
              f"{m['read_parquet']['min']:>8.2f}{m['class_data_versions']['min']:>10.2f}")
    h = r["content_hash"]
    print(f"\nContent hash: sha256 over {h['files']} JPEGs (mean {h['mean_file_bytes']:,} bytes) at "
          f"{h['bytes_per_second_max'] / 1e9:.2f} GB/s on one core (median {h['bytes_per_second_median'] / 1e9:.2f}); "
          f"{h['dataset_gb']:.0f} GB: {h['cpu_seconds_one_core']:.0f} s of one core, {h['cpu_seconds_16_cores']:.1f} s "
          f"on 16, plus reading {h['dataset_gb']:.0f} GB from storage ({h['read_seconds_at_1_gb_s']:.0f} s at 1 GB/s) "
          "at every rescan")


if __name__ == "__main__":
    sys.exit(main())
