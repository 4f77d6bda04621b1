"""Definitions load time and incremental builds of the real CLI, each against a reference from the same run.

Run from the repository root::

    python -m benchmarks.incremental                       # defaults: 1000-class load, 20 x 10 build
    python -m benchmarks.incremental --json incr.json      # also write the results as JSON

What is measured (seconds of wall time, every step in a fresh subprocess):

1. Loading the definitions. A source of ``--load-classes`` class folders (one 8x8 JPEG each) is
   generated; ``import imagenet_int8_assets as m; m.defs`` is timed inside a fresh Python process
   with IMAGENET_INT8_SOURCE set to it and IMAGENET_INT8_OUTPUT set to a folder that does not exist
   (the run checks that loading did not create it), ``--load-repeats`` times; min and median are
   reported. The reference is ``import dagster`` alone, timed the same way: the ratio says how much
   of the load is Dagster's own import.
2. Incremental builds. A deterministic source of ``--classes`` x ``--images-per-class`` 300x240 /
   240x300 JPEGs is built with ``<venv>/bin/imagenet-int8 build`` (tiny-random VAE on the CPU,
   offline, DAGSTER_HOME under the output), then: (b) built again with nothing changed, (c) built
   after one image of one class is rewritten with other content, (d) built with ``--force``. Each is
   reported against (a), the full first build, and with the "N of M class(es) to build" line that
   the CLI prints, and with what its ``reconstruction_report`` step took (read from the run's
   Dagster instance afterwards: the step's wall time and the ``classes_decoded`` /
   ``classes_reused`` metadata, where the code records them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from benchmarks.machine import orchestration_facts, work_folder
from imagenet_int8_assets.sample import synthetic_picture

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # where `imagenet-int8` is installed
PLAN_LINE = re.compile(r"(\d+) of (\d+) class\(es\) to build[^\n]*")

LOAD_CODE = (
    "import time; t = time.perf_counter(); import imagenet_int8_assets as m; m.defs; "
    "print(time.perf_counter() - t)"
)
DAGSTER_CODE = "import time; t = time.perf_counter(); import dagster; print(time.perf_counter() - t)"


def class_name(i: int) -> str:
    return f"n{10000000 + i:08d}"


def base_env(**extra: str) -> dict[str, str]:
    """The caller's environment without IMAGENET_INT8_* or DAGSTER_HOME, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGENET_INT8_", "DAGSTER_HOME"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def tiny_source(root: Path, classes: int) -> Path:
    """``classes`` class folders with one 8x8 JPEG each."""
    for i in range(classes):
        folder = root / class_name(i)
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(folder / "img_0000.JPEG", quality=90)
    return root


def picture(c: int, i: int, seed_offset: int = 0) -> Image.Image:
    w, h = (300, 240) if i % 2 == 0 else (240, 300)
    colour = (40 + 50 * c % 200, 90, 200 - 40 * c % 200)
    return synthetic_picture(w, h, colour, seed=97 * c + i + seed_offset)


def image_path(root: Path, c: int, i: int) -> Path:
    return root / class_name(c) / f"{class_name(c)}_{i:04d}.JPEG"


def build_source(root: Path, classes: int, per_class: int) -> Path:
    """Deterministic: the same arguments give the same files."""
    for c in range(classes):
        (root / class_name(c)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            picture(c, i).save(image_path(root, c, i), quality=90)
    return root


# --------------------------------------------------------------------------------------------
# 1. Loading the definitions
# --------------------------------------------------------------------------------------------


def time_python(code: str, env: dict[str, str]) -> float:
    """Seconds printed by ``code`` run in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"python -c failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def benchmark_load(work: Path, classes: int, repeats: int) -> dict[str, Any]:
    source = tiny_source(work / "load-source", classes)
    output = work / "load-output-never-created"
    env = base_env(IMAGENET_INT8_SOURCE=str(source), IMAGENET_INT8_OUTPUT=str(output))
    load, bare = [], []
    for _ in range(repeats):  # alternate, so a load change on the machine hits both alike
        bare.append(time_python(DAGSTER_CODE, env))
        load.append(time_python(LOAD_CODE, env))
        if output.exists():
            raise AssertionError(f"loading the definitions created the output folder {output}")
    result = {
        "classes": classes,
        "repeats": repeats,
        "defs_seconds": [round(s, 3) for s in load],
        "defs_min": round(min(load), 3),
        "defs_median": round(statistics.median(load), 3),
        "import_dagster_seconds": [round(s, 3) for s in bare],
        "import_dagster_min": round(min(bare), 3),
        "import_dagster_median": round(statistics.median(bare), 3),
        "output_created": output.exists(),
    }
    result["ratio_min"] = round(min(load) / min(bare), 2)
    result["ratio_median"] = round(statistics.median(load) / statistics.median(bare), 2)
    return result


# --------------------------------------------------------------------------------------------
# 2. Incremental builds
# --------------------------------------------------------------------------------------------


REPORT_STEP_CODE = """
import json, sys
import dagster as dg
instance = dg.DagsterInstance.get()
event = instance.get_latest_materialization_event(dg.AssetKey("reconstruction_report"))
stats = instance.get_run_step_stats(event.run_id, step_keys=["reconstruction_report"])[0]
metadata = event.asset_materialization.metadata
out = {"run_id": event.run_id, "seconds": round(stats.end_time - stats.start_time, 2)}
for key in ("classes_decoded", "classes_reused"):
    if key in metadata:
        out[key] = metadata[key].value
print(json.dumps(out))
"""


def report_step(env: dict[str, str]) -> dict[str, Any]:
    """The newest reconstruction_report materialization of the build's instance (DAGSTER_HOME under
    the output): its step's wall time and, where recorded, classes decoded and reused."""
    home = Path(env["IMAGENET_INT8_OUTPUT"]) / "dagster_home"
    proc = subprocess.run(
        [sys.executable, "-c", REPORT_STEP_CODE], check=False, env={**env, "DAGSTER_HOME": str(home)}, cwd=REPO,
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"reading the report step from {home} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_build(env: dict[str, str], *flags: str, timeout: float = 900) -> dict[str, Any]:
    args = [str(BIN / "imagenet-int8"), "build", *flags]
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    text = proc.stdout + "\n" + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{text[-6000:]}")
    match = PLAN_LINE.search(text)
    return {
        "seconds": round(seconds, 2),
        "classes_built": int(match.group(1)) if match else None,
        "classes_total": int(match.group(2)) if match else None,
        "plan": match.group(0) if match else None,
        "report": report_step(env),
    }


def benchmark_builds(work: Path, classes: int, per_class: int) -> dict[str, Any]:
    source = build_source(work / "build-source", classes, per_class)
    output = work / "build-output"
    env = base_env(
        IMAGENET_INT8_SOURCE=str(source),
        IMAGENET_INT8_OUTPUT=str(output),
        IMAGENET_INT8_VAE="tiny-random",
        IMAGENET_INT8_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(work / "hf-cache"),
    )
    steps: dict[str, dict[str, Any]] = {}
    steps["full"] = run_build(env)
    steps["unchanged"] = run_build(env)
    changed = image_path(source, classes // 2, 0)
    picture(classes // 2, 0, seed_offset=100_003).save(changed, quality=90)  # other content, same name
    steps["one_image_changed"] = run_build(env)
    steps["force"] = run_build(env, "--force")
    reference = steps["full"]["seconds"]
    last_report = None
    for step in steps.values():
        step["ratio_vs_full"] = round(step["seconds"] / reference, 3)
        if step["report"]["run_id"] == last_report:  # no new report: the build ran no dataset step
            step["report"] = None
        else:
            last_report = step["report"]["run_id"]
    return {
        "classes": classes,
        "images_per_class": per_class,
        "changed_image": str(changed.relative_to(source)),
        "steps": steps,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def print_report(facts: dict[str, Any], load: dict[str, Any] | None, builds: dict[str, Any] | None) -> None:
    print("Machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    if load:
        print(f"\nLoading the definitions ({load['classes']}-class source, {load['repeats']} fresh processes each):")
        print(f"{'':<34}{'min s':>8}{'median s':>10}")
        print(f"{'import dagster (reference)':<34}{load['import_dagster_min']:>8.2f}{load['import_dagster_median']:>10.2f}")
        print(f"{'import imagenet_int8_assets; .defs':<34}{load['defs_min']:>8.2f}{load['defs_median']:>10.2f}")
        print(f"ratio defs / import dagster: {load['ratio_min']:.2f}x (min), {load['ratio_median']:.2f}x (median); "
              f"output folder created: {'yes' if load['output_created'] else 'no'}")
    if builds:
        print(f"\nIncremental builds ({builds['classes']} classes x {builds['images_per_class']} images, "
              f"imagenet-int8 build, tiny-random on the CPU):")
        print(f"{'build':<28}{'seconds':>9}{'vs full':>9}{'report s':>10}  classes built; report decoded/reused")
        labels = {
            "full": "(a) full first build",
            "unchanged": "(b) nothing changed",
            "one_image_changed": "(c) one image changed",
            "force": "(d) --force",
        }
        for name, step in builds["steps"].items():
            built = f"{step['classes_built']} of {step['classes_total']}" if step["plan"] else "?"
            report = step["report"] or {}
            seconds = f"{report['seconds']:>10.2f}" if report else f"{'-':>10}"
            reuse = f"; {report['classes_decoded']}/{report['classes_reused']}" if "classes_decoded" in report else ""
            print(f"{labels[name]:<28}{step['seconds']:>9.2f}{step['ratio_vs_full']:>8.3f}x{seconds}  {built}{reuse}")
        for name, step in builds["steps"].items():
            print(f"  {labels[name]}: {step['plan']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=20, help="classes of the build source (default 20)")
    parser.add_argument("--images-per-class", type=int, default=10, help="JPEGs per class (default 10)")
    parser.add_argument("--load-classes", type=int, default=1000, help="classes of the load source (default 1000)")
    parser.add_argument("--load-repeats", type=int, default=3, help="fresh processes per load timing (default 3)")
    parser.add_argument("--out", help="work folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--skip-load", action="store_true", help="leave out the definitions load")
    parser.add_argument("--skip-builds", action="store_true", help="leave out the incremental builds")
    args = parser.parse_args(argv)
    if args.classes < 1 or args.images_per_class < 1:
        parser.error("--classes and --images-per-class must be at least 1")

    work, cleanup = work_folder(args.out, "bench-incremental-", parser.error)
    facts = orchestration_facts()
    try:
        load = None if args.skip_load else benchmark_load(work, args.load_classes, args.load_repeats)
        builds = None if args.skip_builds else benchmark_builds(work, args.classes, args.images_per_class)
    finally:
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)
    print_report(facts, load, builds)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": facts, "load": load, "builds": builds}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
