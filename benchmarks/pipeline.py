"""Orchestration overhead: the real `imagenet-int8 build` against the same work without Dagster, same run.

Run from the repository root::

    python -m benchmarks.pipeline                          # defaults: 50 and 200 classes x 50 images
    python -m benchmarks.pipeline --json pipeline.json     # also write the results as JSON
    python -m benchmarks.pipeline --classes 40 --sizes 10 40 --per-run 5 20 40   # a quicker run

What is measured (every build in a fresh subprocess, one after the other; wall seconds, and CPU
seconds of the process and its children from ``getrusage``, with the load average before and after):

1. A deterministic source of ``--classes`` class folders x ``--images-per-class`` JPEGs (300x240 and
   240x300, quality 90, every file different) is generated; each size of ``--sizes`` is built from
   its first classes (copies, not links: the scan reads a linked file once).
2. **CLI**: ``<venv>/bin/imagenet-int8 build --max-partitions-per-run P`` into a fresh output with a
   fresh DAGSTER_HOME, with the settings in ``SETTINGS`` as IMAGENET_INT8_* variables (tiny-random
   VAE on the CPU, ``HF_HUB_OFFLINE=1``, report and probe kept small), for every P of ``--per-run``
   that gives a different number of class runs at that size.
3. **Reference**: the same work done by the core stage functions the assets call, in one fresh Python
   process without Dagster (``reference_build``, run as ``python -m benchmarks.pipeline --reference-config
   ...``): the scan (``scan_source``, same workers), manifest and class list; crops and encode in one
   pass as the ``crops_and_latents`` step does (``encode_classes`` with a ``CropSource``, the VAE
   loaded once); shards (``quantize``, ``write_class_shards``, ``collect_garbage``); statistics
   (``latent_statistics``); the merged dataset (``publish_dataset``); the reconstruction report
   (``report_reconstructions``) and the latent probe (the core calls of its assets, same settings).
   Left out is what Dagster and the asset wrappers add: the instance, runs, steps and their events,
   partitions, staleness, metadata, asset checks, disk-space checks. It runs before the first CLI
   build of a size and after each; a build's reference is the mean of the two around it.
4. Both must build the same dataset: ``mds/index.json`` of every CLI build and of the reference
   must list the same shards (file names, sample counts, sizes, hashes).
5. ``overhead = (CLI - reference) / CLI`` per build, and least-squares fits of the overhead seconds
   (wall and CPU), ``a + b * classes + c * class_runs``, over all CLI builds.
6. Where the CLI's time goes, from its own Dagster instance: start-up until the first run is
   created, launch (run created to started), each step, time in runs outside steps, gaps between
   runs, exit after the last run; events written.
7. What a GPU build adds per run: ``load_vae`` of the full SDXL VAE from a local diffusers folder
   (``sdxl-random`` written with ``save_pretrained``: safetensors, as real weights are stored) against
   ``tiny-random``, in a process that has loaded it once (as every run after the first).
8. The manifest at ImageNet size: a read, one ``groupby`` (``ok_rows_by_class``, what the assets do per
   step) and, for comparison, the per-class mask over every row that they did before.
9. The arithmetic for a GPU build of ImageNet-1k for each value of ``--project-per-run``.

``--crop-size`` (default 32) and ``--torch-threads`` (default 1) apply to both sides. Orchestration
costs are per run, per step, per class and per event, not per pixel, so small crops keep the
identical work (and its noise) small; one torch thread per process avoids the collapse of torch's
two-thread CPU kernels when the 2 cores are shared with other jobs (about 30x slower here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import load_average, orchestration_facts, work_folder
from benchmarks.simulated_gpu import SECONDS_PER_IMAGE_ENV, seconds_per_image
from benchmarks.simulated_gpu import install as install_simulated_gpu

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # where `imagenet-int8` is installed

# The settings both sides use (the CLI reads them from the environment, the reference from here).
SETTINGS = {
    "vae": "tiny-random",
    "device": "cpu",
    "batch_size": 16,
    "precision": "fp32",
    "seed": 0,
    "latent_value": "sample",
    "crop_recipe": "imagenet.int8",
    "crop_size": 32,  # --crop-size
    "workers": 0,  # 0 = all cores, as the CLI's default
    # Crops stored as uint8 arrays, latents with mean and std (both sides crop while they encode,
    # core.latents.pipeline.encode_stream, and write each class's crops and latents as it is done).
    "crop_storage": "raw",
    "latent_storage": "full",
    "report_per_class": 1,
    "report_grid_images": 8,
    "probe_per_class": 4,  # the least the probe trains on (core.quality.probe.MIN_PER_CLASS)
    "probe_max_classes": 2,
    "probe_pool": 8,
}
GPU_IMAGES = 1_281_167  # ImageNet-1k train
GPU_CLASSES = 1000


def class_name(i: int) -> str:
    return f"n{20000000 + i:08d}"


def base_env(**extra: str) -> dict[str, str]:
    """The caller's environment without IMAGENET_INT8_* or DAGSTER_HOME, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGENET_INT8_", "DAGSTER_HOME"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def timed_subprocess(args: list[str], env: dict[str, str], timeout: float = 3600) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``args``; wall seconds, CPU seconds of it and its children, load averages before and after."""
    import resource

    load_before = load_average()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall_start = time.time()
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return proc, {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "wall_start": wall_start,
        "wall_end": time.time(),
        "load_before": load_before,
        "load_after": load_average(),
    }


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------


def make_source(root: Path, classes: int, per_class: int) -> Path:
    """``classes`` x ``per_class`` JPEGs, deterministic, every file different.

    One synthetic picture per class (``sample.synthetic_picture``, about 7 ms), then per image a
    shifted copy with a per-image tint (cheap), 300x240 for even and 240x300 for odd images.
    """
    import numpy as np
    from PIL import Image

    from imagenet_int8_assets.sample import synthetic_picture

    for c in range(classes):
        colour = (40 + 50 * c % 200, 90 + 13 * c % 120, 200 - 40 * c % 200)
        base = np.asarray(synthetic_picture(300, 240, colour, seed=1000 + c))
        folder = root / class_name(c)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.roll(base, 7 * i, axis=1)
            arr = np.clip(arr.astype(np.int16) + np.array([i % 17, -(i % 11), i % 5], np.int16), 0, 255).astype(np.uint8)
            if i % 2:
                arr = arr.transpose(1, 0, 2)
            Image.fromarray(np.ascontiguousarray(arr), "RGB").save(folder / f"{class_name(c)}_{i:04d}.JPEG", quality=90)
    return root


def subset_source(full: Path, root: Path, classes: int) -> Path:
    """The first ``classes`` class folders of ``full``, copied (not linked)."""
    for c in range(classes):
        shutil.copytree(full / class_name(c), root / class_name(c))
    return root


# --------------------------------------------------------------------------------------------
# The reference: the same work with the core functions, no Dagster
# --------------------------------------------------------------------------------------------


def reference_build(source: Path, output: Path, s: dict) -> dict[str, Any]:
    """Build ``source`` into ``output`` as `imagenet-int8 build` does, with the core stage functions
    the assets call (minus what is Dagster's: settings checks against the instance, partitions,
    metadata, asset checks). Returns seconds per phase."""
    phases: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + now - t, 4)
        t = now

    from imagenet_int8_assets.core.common.files import atomic_write_json
    from imagenet_int8_assets.core.common.layout import mds_root, stats_path
    from imagenet_int8_assets.core.common.parallel import default_workers
    from imagenet_int8_assets.core.crops.crop_store import write_crops
    from imagenet_int8_assets.core.dataset.publish_dataset import publish_dataset
    from imagenet_int8_assets.core.dataset.shards_step import write_class_version
    from imagenet_int8_assets.core.latents.devices import resolve_device
    from imagenet_int8_assets.core.latents.encode_step import CropSource, EncodeConfig, encode_classes
    from imagenet_int8_assets.core.latents.vae import load_vae
    from imagenet_int8_assets.core.quality import probe_step
    from imagenet_int8_assets.core.quality.probe import save_features
    from imagenet_int8_assets.core.quality.quantization_stats import latent_statistics
    from imagenet_int8_assets.core.quality.report_step import ReportConfig, report_reconstructions
    from imagenet_int8_assets.core.source.images import DEFAULT_MAX_PIXELS
    from imagenet_int8_assets.core.source.manifest import ok_rows_by_class, read_manifest, recorded_labels
    from imagenet_int8_assets.core.source.scan_step import scan_manifest, write_manifest
    from imagenet_int8_assets.core.source.sources import resolve_source_root

    lap("imports")
    workers, quant = (s["workers"] if s["workers"] > 0 else default_workers()), s.get("quant_range", 0.0)
    scan = scan_manifest(Path(source).expanduser().resolve(), output, DEFAULT_MAX_PIXELS, workers)  # raw_manifest
    write_manifest(output, scan)
    keys = sorted(scan.classes)
    lap("scan")

    class Crops:  # what preprocessed_crops writes, as each class is encoded (assets/crops.CropWriter)
        def write(self, key, ids, images, failed) -> None:
            write_crops(output, key, ids, images, {"recipe": s["crop_recipe"], "size": s["crop_size"],
                        "max_pixels": DEFAULT_MAX_PIXELS, "failed": failed}, storage=s["crop_storage"], source_root=root)

        def summary(self, classes: int) -> str:
            return f"crops of {classes} class(es) written"

    rows, root = ok_rows_by_class(read_manifest(output), keys), resolve_source_root(source)
    config = EncodeConfig(
        output=output, precision=s["precision"], batch_size=s["batch_size"], workers=workers,
        latent_value=s["latent_value"], seed=s["seed"], latent_storage=s["latent_storage"],
        crop_recipe=s["crop_recipe"], crop_size=s["crop_size"], max_pixels=DEFAULT_MAX_PIXELS, device=s["device"],
    )
    vae = load_vae(s["vae"], fallback=None)  # one model for the whole build: the reference has no runs
    lap("vae_load")
    encoded = encode_classes(config, keys, lambda: (vae, ""), crop_source=CropSource(rows, root), crop_writer=Crops())
    lap("crops_encode")
    labels = recorded_labels(output, keys)
    for key in keys:  # mds_shards
        write_class_version(output, key, labels.index[key], labels.text[key], quant)
    lap("shards")
    atomic_write_json(stats_path(output), latent_statistics(output, keys, quant).record)  # quantization_stats
    lap("stats")
    publish_dataset(mds_root(output), keys, {k: len(r) for k, r in rows.items()})  # mds_dataset
    lap("dataset")
    report_reconstructions(ReportConfig(output, s["report_per_class"], s["report_grid_images"], s["seed"],
                                        resolve_device(s["device"])), keys)
    lap("report")
    probed = probe_step.probed_classes(keys, s["probe_max_classes"], s["seed"])  # probe_features, latent_probe
    features = probe_step.collect_probe_features(output, probed, labels, s["probe_per_class"], s["probe_pool"], s["seed"])
    save_features(probe_step.features_path(output), features.labels, features.class_names, features.arrays)
    outcome = probe_step.probe_latents(output, s["seed"])
    if outcome.report is not None:
        outcome.report.write(probe_step.report_dir(output))
    lap("probe")
    return {"phases": phases, "files": len(scan.frame), "images": encoded.written,
            "classes": len(keys), "workers": workers}


def reference_main(config_path: str, result_path: str) -> int:
    """The reference subprocess: read the config, build, write the phase timings."""
    cfg = json.loads(Path(config_path).read_text())
    install_simulated_gpu()  # the same simulated encode time as the CLI's (when the env asks for it)
    started = time.perf_counter()
    result = reference_build(Path(cfg["source"]), Path(cfg["output"]), cfg["settings"])
    result["inside_seconds"] = round(time.perf_counter() - started, 3)
    Path(result_path).write_text(json.dumps(result, indent=2))
    return 0


def run_reference(work: Path, source: Path, output: Path, env: dict[str, str], tag: str) -> dict[str, Any]:
    config = work / f"reference-{tag}.json"
    result = work / f"reference-{tag}-result.json"
    config.write_text(json.dumps({"source": str(source), "output": str(output), "settings": SETTINGS}))
    args = [sys.executable, "-m", "benchmarks.pipeline", "--reference-config", str(config), "--reference-result", str(result)]
    proc, timing = timed_subprocess(args, env)
    if proc.returncode != 0:
        raise RuntimeError(f"reference build failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    out = json.loads(result.read_text())
    out.update(timing)
    return out


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------


def settings_env(work: Path, threads: int) -> dict[str, str]:
    """What both sides get: offline, and torch's thread count (``--torch-threads``)."""
    extra = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(work / "hf-cache")}
    if threads > 0:
        extra.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return base_env(**extra)


def cli_env(source: Path, output: Path, common: dict[str, str]) -> dict[str, str]:
    values = {f"IMAGENET_INT8_{k.upper()}": str(v) for k, v in SETTINGS.items()}
    return {
        **common,
        "IMAGENET_INT8_SOURCE": str(source),
        "IMAGENET_INT8_OUTPUT": str(output),
        "DAGSTER_HOME": str(output / "dagster_home"),
        **values,
    }


def run_cli(env: dict[str, str], per_run: int) -> dict[str, Any]:
    """`imagenet-int8 build`; with a simulated GPU, the same command through ``benchmarks.simulated_gpu``."""
    command = [sys.executable, "-m", "benchmarks.simulated_gpu"] if env.get(SECONDS_PER_IMAGE_ENV) else [str(BIN / "imagenet-int8")]
    args = [*command, "build", "--max-partitions-per-run", str(per_run)]
    if env.get(SECONDS_PER_IMAGE_ENV):  # a GPU node's default: one run encodes, the next gets ready
        args += ["--runs-at-once", "2"]
    proc, timing = timed_subprocess(args, env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return {"per_run": per_run, **timing}


def cli_breakdown(home: Path, wall_start: float, wall_end: float) -> dict[str, Any]:
    """Where the CLI's time went, from the runs and step events in its Dagster instance."""
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
    try:
        records = sorted(instance.get_run_records(), key=lambda r: r.create_timestamp.timestamp())
        runs = []
        for record in records:
            run_id = record.dagster_run.run_id
            events = instance.all_logs(run_id)
            starts, steps = {}, {}
            kinds: dict[str, int] = {}
            device: dict[str, float] = {}  # when the encode step got its device, and when its stream ended
            for entry in events:
                event = entry.dagster_event
                kind = event.event_type_value if event is not None else "LOG"
                kinds[kind] = kinds.get(kind, 0) + 1
                message = entry.user_message or ""
                if event is None and message.startswith("Loaded VAE"):  # core.latents.encode_step._Encoding, after the lease
                    device["leased"] = entry.timestamp
                elif event is None and "streamed into the encoder" in message:  # assets/latents._stream's end
                    device["encoded"] = entry.timestamp
                if event is None or not entry.step_key:
                    continue
                if kind == "STEP_START":
                    starts[entry.step_key] = entry.timestamp
                elif kind in ("STEP_SUCCESS", "STEP_FAILURE") and entry.step_key in starts:
                    steps[entry.step_key] = round(entry.timestamp - starts[entry.step_key], 3)
            created = record.create_timestamp.timestamp()
            runs.append(
                {
                    "run_id": run_id,
                    "selection": sorted(str(k.to_user_string()) for k in (record.dagster_run.asset_selection or [])),
                    "partitions": record.dagster_run.tags.get("dagster/asset_partition_range_start"),
                    "created": created,
                    "start": record.start_time,
                    "end": record.end_time,
                    "seconds": round((record.end_time or created) - created, 3),
                    "steps": steps,
                    "events": len(events),
                    "event_kinds": kinds,
                    **device,
                }
            )
        # What the progress bar of `imagenet-int8 build` costs (cli.RunProgress, once a second, reads
        # the materializations recorded since its last poll), on the run with the most of them: the
        # CLI's own class, timed reading them all once and then polling with nothing new.
        from imagenet_int8_assets.build.run_events import RunProgress

        class _Bar:
            def update(self, n: int) -> None:
                self.n = getattr(self, "n", 0) + n

        biggest = max(runs, key=lambda r: r["event_kinds"].get("ASSET_MATERIALIZATION", 0))
        reads, empties = [], []
        for _ in range(3):
            progress = RunProgress(instance, biggest["run_id"], _Bar())
            t = time.perf_counter()
            progress._update()
            reads.append(time.perf_counter() - t)
            t = time.perf_counter()
            progress._update()
            empties.append(time.perf_counter() - t)
            count = progress.bar.n
        poll = {"materializations": count, "read_all_s": round(min(reads), 4),
                "per_materialization_s": round(min(reads) / max(count, 1), 6), "empty_poll_s": round(min(empties), 5)}
    finally:
        instance.dispose()
    first, last = runs[0], runs[-1]
    gaps = [round(b["created"] - a["end"], 3) for a, b in zip(runs, runs[1:])]
    in_runs = sum(r["seconds"] for r in runs)
    in_steps = sum(sum(r["steps"].values()) for r in runs)
    step_totals: dict[str, float] = {}
    for r in runs:
        for name, sec in r["steps"].items():
            step_totals[name] = round(step_totals.get(name, 0.0) + sec, 3)
    encodes = sorted((r["leased"], r["encoded"]) for r in runs if "leased" in r and "encoded" in r)
    timeline = {}
    if encodes:
        timeline = {
            "first_lease": round(encodes[0][0] - wall_start, 3),
            "handoffs": [round(max(0.0, b[0] - a[1]), 3) for a, b in zip(encodes, encodes[1:])],
            "encoding": round(sum(e - s for s, e in encodes), 3),
            "after_last_encode": round(wall_end - encodes[-1][1], 3),
        }
    return {
        "device_timeline": timeline,
        "startup_to_first_run": round(first["created"] - wall_start, 3),
        "after_last_run": round(wall_end - (last["end"] or last["created"]), 3),
        "between_runs": gaps,
        "in_runs": round(in_runs, 3),
        "in_steps": round(in_steps, 3),
        "runs_outside_steps": round(in_runs - in_steps, 3),
        "step_totals": step_totals,
        "events": sum(r["events"] for r in runs),
        "progress_poll": poll,
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------
# Checks and the model
# --------------------------------------------------------------------------------------------


def dataset_identity(output: Path) -> dict[str, Any]:
    """What makes the dataset's bytes: the published index's shards and sample count."""
    index = json.loads((output / "mds" / "index.json").read_text())
    shards = [
        {"basename": sh["raw_data"]["basename"], "samples": sh["samples"], "bytes": sh["raw_data"]["bytes"],
         "hashes": sh["raw_data"].get("hashes")}
        for sh in index["shards"]
    ]
    body = dict(index)
    return {"shards": shards, "samples": sum(s["samples"] for s in shards), "index": body}


def same_dataset(a: Path, b: Path) -> dict[str, Any]:
    x, y = dataset_identity(a), dataset_identity(b)
    return {
        "samples": [x["samples"], y["samples"]],
        "shards": len(x["shards"]),
        "shards_equal": x["shards"] == y["shards"],
        "index_equal": x["index"] == y["index"],
    }


def fit_overhead(points: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Least squares: overhead seconds (``key``) = a + b * classes + c * class_runs."""
    import numpy as np

    x = np.array([[1.0, p["classes"], p["class_runs"]] for p in points])
    y = np.array([p[key] for p in points])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    residuals = y - x @ coef
    return {
        "a_fixed_s": round(float(coef[0]), 3),
        "b_per_class_s": round(float(coef[1]), 4),
        "c_per_run_s": round(float(coef[2]), 3),
        "residuals_s": [round(float(r), 2) for r in residuals],
        "points": len(points),
    }


# --------------------------------------------------------------------------------------------
# The per-run cost a GPU build adds: loading the SDXL VAE
# --------------------------------------------------------------------------------------------

LOAD_CODE = """
import json, sys, time
from imagenet_int8_assets.core.latents.vae import load_vae
spec, repeats = sys.argv[1], int(sys.argv[2])
t = time.perf_counter(); load_vae(spec); first = time.perf_counter() - t  # imports, cold caches
times = []
for _ in range(repeats):
    t = time.perf_counter(); load_vae(spec); times.append(time.perf_counter() - t)
print(json.dumps({"first": round(first, 3), "seconds": [round(x, 3) for x in times]}))
"""


def vae_load_seconds(work: Path, repeats: int, env: dict[str, str]) -> dict[str, Any]:
    """What ``vae_latents`` pays in every run to load its VAE (``load_vae``), in a process that has
    loaded it once already (as every run after the first of an `imagenet-int8 build`): tiny-random
    against the full SDXL VAE read from a local diffusers folder (safetensors, as real weights are
    stored; written here from ``sdxl-random`` with ``save_pretrained``)."""
    folder = work / "sdxl-vae-folder"
    save = (
        "import sys; from imagenet_int8_assets.core.latents.vae import load_vae; "
        "load_vae('sdxl-random').model.save_pretrained(sys.argv[1], safe_serialization=True)"
    )
    subprocess.run([sys.executable, "-c", save, str(folder)], env=env, cwd=REPO, check=True, capture_output=True, timeout=900)
    out: dict[str, Any] = {"repeats": repeats, "load_before": load_average()}
    for name, spec in (("tiny-random", "tiny-random"), ("sdxl_folder", str(folder))):
        proc = subprocess.run([sys.executable, "-c", LOAD_CODE, spec, str(repeats)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"load_vae({spec!r}) failed:\n{proc.stderr[-3000:]}")
        times = json.loads(proc.stdout.strip().splitlines()[-1])
        out[name] = {**times, "min": min(times["seconds"]), "median": sorted(times["seconds"])[len(times["seconds"]) // 2]}
    out["weights_bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    out["extra_per_run_s"] = round(out["sdxl_folder"]["median"] - out["tiny-random"]["median"], 3)
    out["load_after"] = load_average()
    shutil.rmtree(folder, ignore_errors=True)
    return out


# What the asset wrappers do with the manifest beyond the reference, read from the code of this
# commit (assets/crops.py, assets/shards.py): per class run, ``read_manifest`` and one
# ``ok_rows_by_class`` groupby in preprocessed_crops, mds_shards and the mds_count_matches_manifest
# check (the reference reads and groups it once). Nothing per class: the steps no longer filter every
# row once per class.
EXTRA_MANIFEST_PASSES_PER_RUN = 3


def manifest_seconds(rows: int = GPU_IMAGES, classes: int = GPU_CLASSES, repeats: int = 10) -> dict[str, Any]:
    """An ImageNet-size manifest (the real columns): selecting one class's good rows with a boolean mask
    over every row (what the assets did per class before), one ``groupby`` for all classes (what
    ``ok_rows_by_class`` does per step now), reading the
    parquet file (``read_manifest``), which cost nothing measurable at the benchmark's size, listing
    as many class folders (``find_class_folders``) and the classes' data versions."""
    import io

    import numpy as np
    import pandas as pd

    names = np.array([class_name(i) for i in range(classes)], dtype=object)
    per = -(-rows // classes)
    folder = np.repeat(names, per)[:rows]
    frame = pd.DataFrame({
        "id": [f"{c}/{c}_{i}.JPEG" for i, c in enumerate(folder)], "class_folder": folder,
        "label": np.repeat(np.arange(classes), per)[:rows], "label_text": "tench, Tinca tinca",
        "width": 500, "height": 375, "mode": "RGB", "format": "JPEG", "bytes": np.arange(rows) + 100_000,
        "mtime_ns": np.arange(rows) * 1000, "status": "ok", "reason": "",
    })
    times = []
    for key in names[:repeats]:
        t = time.perf_counter()
        frame[(frame["class_folder"] == key) & (frame["status"] == "ok")]
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    {k: len(g) for k, g in frame[frame["status"] == "ok"].groupby("class_folder", sort=False)}
    grouped = time.perf_counter() - t
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    reads, counts = [], []
    for _ in range(3):
        t = time.perf_counter()
        pd.read_parquet(io.BytesIO(buffer.getvalue()))
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()  # what the steps that only count good images per class read and do
        two = pd.read_parquet(io.BytesIO(buffer.getvalue()), columns=["class_folder", "status"])
        two.loc[two["status"] == "ok", "class_folder"].value_counts()
        counts.append(time.perf_counter() - t)
    filter_s = sorted(times)[len(times) // 2]
    # what every scan does once per build whatever changed: listing the class folders (three times:
    # settings check, manifest step, scan; it compared every folder with every other before: 2.4 s
    # a call at 1,000 classes) and the classes' data versions
    import tempfile

    from imagenet_int8_assets.core.source.sources import ClassLabels, class_data_versions, find_class_folders

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            os.mkdir(os.path.join(tmp, name))
        t = time.perf_counter()
        found = find_class_folders(tmp)
        folders_s = time.perf_counter() - t
        assert len(found.names) == classes
    labels = ClassLabels("imagenet", {n: i for i, n in enumerate(names)}, {n: "tench" for n in names}, "")
    t = time.perf_counter()
    class_data_versions(frame, labels)
    versions_s = time.perf_counter() - t
    return {"rows": rows, "classes": classes, "filter_per_class_s": round(filter_s, 4),
            "find_class_folders_s": round(folders_s, 3), "class_data_versions_s": round(versions_s, 3),
            "read_and_count_two_columns_s": round(min(counts), 3),
            "filter_pass_over_all_classes_s": round(filter_s * classes, 1), "groupby_once_s": round(grouped, 3),
            "parquet_bytes": len(buffer.getvalue()), "read_parquet_s": round(min(reads), 3), "load": load_average()}


# --------------------------------------------------------------------------------------------
# GPU arithmetic
# --------------------------------------------------------------------------------------------


def project(fit: dict[str, Any], sdxl_per_run: float, manifest: dict[str, Any] | None, poll_s: dict[str, Any] | None,
            rates: list[float], per_runs: list[int], images: int = GPU_IMAGES, classes: int = GPU_CLASSES,
            budget: float = 0.03) -> dict[str, Any]:
    """The overhead of a GPU build of ``classes`` classes for each classes-per-run value.

    The fit, plus per run the SDXL VAE's load (against tiny-random's); with ``manifest``, the extra
    manifest reads and groupbys per run at ImageNet size (they cost nothing at the benchmark's
    size); with ``poll_s`` (the measured poll: ``empty_poll_s``, ``per_materialization_s``), the CLI's
    progress poll, once a second during the encode, reading each new materialization once (3 per
    class), whatever the run size. Shares are of the build's
    wall time = encode (``images`` / rate) + overhead. ``run_bound_per_run``: the smallest classes per
    run whose run-dependent part is within ``budget`` of the encode at the fastest rate; ``best_per_run``:
    the value with the least overhead at the slowest and at the fastest rate."""
    per_run_cost = fit["c_per_run_s"] + sdxl_per_run
    per_class_cost = fit["b_per_class_s"]
    fixed = fit["a_fixed_s"]
    if manifest:
        per_run_cost += EXTRA_MANIFEST_PASSES_PER_RUN * (manifest["read_parquet_s"] + manifest["groupby_once_s"])
    encode = {str(r): images / r for r in rates}
    rows = []
    for p in per_runs:
        runs = class_runs(classes, p)
        row: dict[str, Any] = {"per_run": p, "class_runs": runs}
        for r, enc in encode.items():
            # one poll a second during the encode, each new materialization read once (3 per class)
            poll = (poll_s["empty_poll_s"] * enc + poll_s["per_materialization_s"] * 3 * classes) if poll_s else 0.0
            run_part = per_run_cost * runs + poll
            overhead = fixed + per_class_cost * classes + run_part
            row[f"overhead_at_{r}"] = round(overhead, 1)
            row[f"run_part_at_{r}"] = round(run_part, 1)
            row[f"poll_at_{r}"] = round(poll, 1)
            row[f"share_at_{r}"] = round(overhead / (enc + overhead), 4)
            row[f"run_part_of_encode_at_{r}"] = round(run_part / enc, 4)
        rows.append(row)
    fast_key = str(max(rates))
    bound = [r["per_run"] for r in rows if r[f"run_part_of_encode_at_{fast_key}"] <= budget]
    best = {k: min(rows, key=lambda r: r[f"overhead_at_{k}"])["per_run"] for k in encode}
    return {
        "images": images, "classes": classes, "budget": budget,
        "encode_s": {k: round(v, 1) for k, v in encode.items()},
        "fixed_s": round(fixed, 3), "per_class_s": round(per_class_cost, 4), "per_run_s": round(per_run_cost, 3),
        "sdxl_per_run_s": sdxl_per_run, "imagenet_manifest_terms": bool(manifest), "poll": poll_s,
        "rows": rows,
        "run_bound_per_run": min(bound) if bound else None,
        "best_per_run": best,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def print_report(res: dict[str, Any]) -> None:
    print("Machine: " + ", ".join(f"{k}={v}" for k, v in res["machine"].items()))
    if res.get("simulated_gpu"):
        g = res["simulated_gpu"]
        print(f"Simulated GPU (both sides): an ImageNet class at {g['rate']:.0f} images/s, {g['seconds_per_class']:.3f} s of "
              f"encode per class ({g['seconds_per_image'] * 1e3:.2f} ms per image), the CPU idle meanwhile")
    print(f"Source: {res['source']['classes']} classes x {res['source']['images_per_class']} JPEGs, generated in "
          f"{res['source']['seconds']:.1f} s; settings: " + ", ".join(f"{k}={v}" for k, v in SETTINGS.items()))
    print(f"\n{'classes':>7} {'per run':>7} {'runs':>4} {'CLI s':>8} {'ref s':>8} {'overhead s':>10} {'overhead':>8} "
          f"{'CLI cpu s':>9} {'ref cpu s':>9} {'ovh cpu s':>9} {'same data':>9}  load before / after")
    for p in res["points"]:
        print(f"{p['classes']:>7} {p['per_run']:>7} {p['class_runs']:>4} {p['cli_s']:>8.2f} {p['reference_s']:>8.2f} "
              f"{p['overhead_s']:>10.2f} {p['overhead']:>8.1%} {p['cli_cpu_s']:>9.2f} {p['reference_cpu_s']:>9.2f} "
              f"{p['overhead_cpu_s']:>9.2f} {'yes' if p['same_dataset'] else 'NO':>9}  {p['load_before']} / {p['load_after']}")
    for size in res["sizes"]:
        refs = size["references"]
        print(f"\nReference, {size['classes']} classes: " + "; ".join(
            f"{r['seconds']:.2f} s, cpu {r['cpu_seconds']:.2f} s (load {r['load_before']})" for r in refs)
            + f"; same dataset every time: {'yes' if size['references_same_dataset'] else 'NO'}")
        phases = refs[0]["phases"]
        print("  phases (first): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
        print(f"  scan: {refs[0]['files']} files in {phases['scan']:.2f} s = "
              f"{refs[0]['files'] / phases['scan']:.0f} files/s ({refs[0]['workers']} workers)")
        for b in size["cli"]:
            d = b["breakdown"]
            manifest = d["step_totals"].get("raw_manifest", 0.0)
            encode = d["step_totals"].get("crops_and_latents", 0.0)
            print(f"  CLI per run {b['per_run']}: {b['seconds']:.2f} s: start-up to first run {d['startup_to_first_run']:.2f}, "
                  f"in runs {d['in_runs']:.2f} (steps {d['in_steps']:.2f}, outside steps {d['runs_outside_steps']:.2f}), "
                  f"between runs {sum(d['between_runs']):.2f}, after the last run {d['after_last_run']:.2f}; "
                  f"{d['events']} events; raw_manifest step {manifest:.2f} s ({manifest / b['seconds']:.1%} of the build), "
                  f"crops_and_latents steps {encode:.2f} s")
            print("    steps: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(d["step_totals"].items())))
            t = d.get("device_timeline")
            if t:  # the device's view: when it started, how long it sat idle between runs, what followed
                ref_start = sum(phases.get(k, 0.0) for k in ("imports", "scan", "vae_load"))
                ref_after = sum(v for k, v in phases.items() if k not in ("imports", "scan", "vae_load", "crops_encode"))
                print(f"    device: first lease at {t['first_lease']:.2f} s (the reference's encode starts at {ref_start:.2f} s); "
                      f"idle between runs {sum(t['handoffs']):.2f} s ({', '.join(f'{h:.2f}' for h in t['handoffs'])}); "
                      f"leased and encoding {t['encoding']:.2f} s (the reference's crops_encode {phases['crops_encode']:.2f} s); "
                      f"after the last encode {t['after_last_encode']:.2f} s (the reference: {ref_after:.2f} s)")
    for name, label in (("fit", "wall"), ("fit_cpu", "CPU")):
        fit = res[name]
        print(f"\nFit over {fit['points']} builds, {label}: overhead s = {fit['a_fixed_s']:.2f} + {fit['b_per_class_s']:.4f} "
              f"x classes + {fit['c_per_run_s']:.2f} x class runs (residuals {fit['residuals_s']})")
    if res.get("vae_load"):
        v = res["vae_load"]
        print(f"load_vae in a warm process (median of {v['repeats']}): tiny-random {v['tiny-random']['median']:.2f} s, "
              f"SDXL folder ({v['weights_bytes'] / 1e6:.0f} MB safetensors) {v['sdxl_folder']['median']:.2f} s "
              f"(first load {v['sdxl_folder']['first']:.2f} s): +{v['extra_per_run_s']:.2f} s per run with the SDXL VAE")
    pp = res["progress_poll"]
    print(f"Progress poll of the CLI (the materializations new since the last poll, once a second): reading "
          f"{pp['materializations']} {pp['read_all_s'] * 1e3:.0f} ms = {pp['per_materialization_s'] * 1e3:.3f} ms each, "
          f"a poll with nothing new {pp['empty_poll_s'] * 1e3:.2f} ms")
    mf = res["manifest"]
    print(f"ImageNet-size manifest ({mf['rows']:,} rows, {mf['parquet_bytes'] / 1e6:.0f} MB parquet): one class's rows "
          f"selected as the assets do {mf['filter_per_class_s'] * 1e3:.0f} ms = {mf['filter_pass_over_all_classes_s']:.0f} s "
          f"per pass over {mf['classes']} classes (one groupby for all: {mf['groupby_once_s']:.2f} s); read_parquet "
          f"{mf['read_parquet_s']:.2f} s (two columns and a count per class: {mf['read_and_count_two_columns_s']:.2f} s); class folders listed {mf['find_class_folders_s']:.3f} s, data versions "
          f"{mf['class_data_versions_s']:.2f} s (load {mf['load']})")
    if res.get("simulated_gpu"):
        print("\nNo projection from the fit with a simulated GPU (it does not model overlapping runs): see "
              "docs/BENCHMARKS.md, 'Class runs at once'.")
        return
    for label, proj in (("fit only", res["projection_fit"]), ("at ImageNet size", res["projection"])):
        poll = proj["poll"]
        print(f"\nGPU build of {proj['classes']} classes, {proj['images']:,} images ({label}): overhead = "
              f"{proj['fixed_s']:.1f} + {proj['per_class_s']:.3f} x classes + {proj['per_run_s']:.2f} x runs"
              + (f" + progress poll ({poll['empty_poll_s'] * 1e3:.2f} ms x encode s + "
                 f"{poll['per_materialization_s'] * 1e3:.3f} ms x 3 x classes)" if poll else "")
              + "; encode: " + ", ".join(f"{v / 60:.1f} min at {k} img/s" for k, v in proj["encode_s"].items()))
        for row in proj["rows"]:
            cells = "; ".join(
                f"at {r}: {row[f'overhead_at_{r}']:.0f} s = {row[f'share_at_{r}']:.1%} of the build, run-dependent "
                f"{row[f'run_part_at_{r}']:.0f} s (poll {row[f'poll_at_{r}']:.0f}) = {row[f'run_part_of_encode_at_{r}']:.1%} of the encode"
                for r in proj["encode_s"]
            )
            print(f"  {row['per_run']:>5} classes per run, {row['class_runs']:>3} runs: {cells}")
        print(f"  smallest classes per run with the run-dependent part within {proj['budget']:.0%} of the fastest encode: "
              f"{proj['run_bound_per_run']}; least overhead: "
              + ", ".join(f"{v} at {k} img/s" for k, v in proj["best_per_run"].items()))


def class_runs(classes: int, per_run: int) -> int:
    """The class runs `imagenet-int8 build` makes of ``classes`` classes (``class_runs.class_batches``)."""
    from imagenet_int8_assets.build.class_runs import class_batches

    return len(class_batches(range(classes), range(classes), per_run))


def distinct_per_runs(size: int, per_runs: list[int]) -> list[int]:
    """The values of ``per_runs`` that give ``size`` classes different numbers of class runs."""
    out, seen = [], set()
    for p in per_runs:
        if class_runs(size, p) not in seen:
            seen.add(class_runs(size, p))
            out.append(p)
    return out


def measure_size(work: Path, source: Path, size: int, per_class: int, per_runs: list[int],
                 common: dict[str, str]) -> dict[str, Any]:
    """Reference, then for each distinct run count a CLI build followed by a reference: each build's
    reference is the mean of the two around it (a change of load during the run hits both sides)."""
    refs, builds = [], []
    ref_out = work / f"ref-{size}-0"
    refs.append(run_reference(work, source, ref_out, common, f"{size}-0"))
    ref_same = []
    for n, p in enumerate(distinct_per_runs(size, per_runs), 1):
        output = work / f"cli-{size}-{p}"
        build = run_cli(cli_env(source, output, common), p)
        build["breakdown"] = cli_breakdown(output / "dagster_home", build["wall_start"], build["wall_end"])
        build["same_dataset"] = same_dataset(ref_out, output)
        builds.append(build)
        shutil.rmtree(output, ignore_errors=True)
        again = work / f"ref-{size}-{n}"
        refs.append(run_reference(work, source, again, common, f"{size}-{n}"))
        ref_same.append(same_dataset(ref_out, again)["index_equal"])
        shutil.rmtree(again, ignore_errors=True)
    shutil.rmtree(ref_out, ignore_errors=True)
    points = []
    for n, b in enumerate(builds):
        around = refs[n : n + 2]
        reference = sum(r["seconds"] for r in around) / 2
        reference_cpu = sum(r["cpu_seconds"] for r in around) / 2
        same = b["same_dataset"]
        points.append({
            "classes": size,
            "images": size * per_class,
            "per_run": b["per_run"],
            "class_runs": class_runs(size, b["per_run"]),
            "cli_s": b["seconds"],
            "reference_s": round(reference, 3),
            "overhead_s": round(b["seconds"] - reference, 3),
            "overhead": round((b["seconds"] - reference) / b["seconds"], 4),
            "cli_cpu_s": b["cpu_seconds"],
            "reference_cpu_s": round(reference_cpu, 3),
            "overhead_cpu_s": round(b["cpu_seconds"] - reference_cpu, 3),
            "same_dataset": same["shards_equal"] and same["samples"][0] == same["samples"][1],
            "load_before": b["load_before"],
            "load_after": b["load_after"],
        })
    return {"classes": size, "references": refs, "references_same_dataset": all(ref_same), "cli": builds, "points": points}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=200, help="classes of the generated source (default 200)")
    parser.add_argument("--images-per-class", type=int, default=50, help="JPEGs per class (default 50)")
    parser.add_argument("--sizes", type=int, nargs="+", help="class counts to build (default: 50 and --classes)")
    parser.add_argument("--per-run", type=int, nargs="+", default=[10, 50, 200],
                        help="--max-partitions-per-run values (default 10 50 200; one build per distinct run count)")
    parser.add_argument("--crop-size", type=int, default=32,
                        help="crop side on both sides (default 32: cheap work, the orchestration is the same)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="OMP_NUM_THREADS for both sides (default 1; 0 = torch's default, all cores)")
    parser.add_argument("--gpu-rates", type=float, nargs="+", default=[1700.0, 2900.0],
                        help="SDXL encode images/s on the GPU for the projection (default 1700 2900)")
    parser.add_argument("--project-per-run", type=int, nargs="+", default=[10, 25, 50, 100, 125, 200, 250, 500, 1000],
                        help="classes per run to project for 1,000 classes")
    parser.add_argument("--simulate-gpu", type=float, default=0.0, metavar="RATE",
                        help="make each class's encode last as long as an ImageNet class's at RATE images/s on a GPU, "
                             "the CPU idle meanwhile, on both sides (benchmarks/simulated_gpu.py; default 0: off)")
    parser.add_argument("--vae-load-repeats", type=int, default=3, help="fresh processes per load_vae timing (default 3)")
    parser.add_argument("--skip-vae-load", action="store_true", help="leave out the SDXL load timing")
    parser.add_argument("--out", help="work folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--reference-config", help=argparse.SUPPRESS)
    parser.add_argument("--reference-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_config:
        return reference_main(args.reference_config, args.reference_result)
    sizes = sorted(set(args.sizes or [min(50, args.classes), args.classes]))
    if args.classes < 1 or args.images_per_class < 1 or min(sizes) < 1 or max(sizes) > args.classes:
        parser.error("--classes and --images-per-class must be at least 1, --sizes between 1 and --classes")

    work, cleanup = work_folder(args.out, "bench-pipeline-", parser.error)
    total_start = time.perf_counter()
    SETTINGS["crop_size"] = args.crop_size
    common = settings_env(work, args.torch_threads)
    if args.simulate_gpu > 0:
        per_image = seconds_per_image(args.simulate_gpu, GPU_IMAGES / GPU_CLASSES, args.images_per_class)
        common[SECONDS_PER_IMAGE_ENV] = repr(per_image)
    res: dict[str, Any] = {"machine": orchestration_facts(), "settings": SETTINGS, "torch_threads": args.torch_threads or "default",
                           "sizes": [], "points": []}
    if args.simulate_gpu > 0:
        res["simulated_gpu"] = {"rate": args.simulate_gpu, "seconds_per_image": per_image,
                                "seconds_per_class": per_image * args.images_per_class}
    try:
        # warm the page cache for the interpreter's imports, so that the first timed build does not pay it
        subprocess.run([sys.executable, "-c", "import dagster, torch, streaming, sklearn, imagenet_int8_assets as m; m.defs"],
                       env=common, cwd=REPO, capture_output=True, timeout=600)
        t = time.perf_counter()
        full = make_source(work / "source-full", args.classes, args.images_per_class)
        res["source"] = {"classes": args.classes, "images_per_class": args.images_per_class,
                         "seconds": round(time.perf_counter() - t, 2)}
        for size in sizes:
            source = full if size == args.classes else subset_source(full, work / f"source-{size}", size)
            res["sizes"].append(measure_size(work, source, size, args.images_per_class, args.per_run, common))
            res["points"].extend(res["sizes"][-1]["points"])
        res["fit"] = fit_overhead(res["points"], "overhead_s")
        res["fit_cpu"] = fit_overhead(res["points"], "overhead_cpu_s")
        res["vae_load"] = None if args.skip_vae_load else vae_load_seconds(work, args.vae_load_repeats, common)
        res["manifest"] = manifest_seconds()
        extra = res["vae_load"]["extra_per_run_s"] if res["vae_load"] else 0.0
        polls = [b["breakdown"]["progress_poll"] for size in res["sizes"] for b in size["cli"]]
        biggest = max(polls, key=lambda q: q["materializations"])
        res["progress_poll"] = biggest
        if args.simulate_gpu > 0:
            # the encode is in the builds, and the class runs overlap: the overhead measured is what
            # shows beside a GPU's encode. The linear fit does not model the overlap (a one-run build
            # pays its whole tail after its encode, a many-run build only its last run's), so no
            # projection is printed from it: docs/BENCHMARKS.md projects 1,000 classes from the parts.
            res["projection_fit"] = res["projection"] = None
        else:
            res["projection_fit"] = project(res["fit"], extra, None, None, args.gpu_rates, args.project_per_run)
            res["projection"] = project(res["fit"], extra, res["manifest"], biggest,
                                        args.gpu_rates, args.project_per_run)
    finally:
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)
    res["total_seconds"] = round(time.perf_counter() - total_start, 1)
    res["machine"]["load_average_at_end"] = load_average()
    print_report(res)
    print(f"\nWhole benchmark: {res['total_seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
