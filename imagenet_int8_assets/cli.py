"""``imagenet-int8``: build the whole dataset through Dagster from the command line.

``imagenet-int8 build`` materializes every asset for every partition with the same assets the UI
runs, in batched runs (one for the manifest, one per ``max partitions per run`` classes, one for
the statistics and the merged dataset), showing a progress bar. The class runs go several at once,
each in a process of its own (``class_runs``): one per device encodes while one more gets ready. ``imagenet-int8 demo`` does the
same on the bundled sample data and says where the result is and how to read it. ``imagenet-int8
publish`` builds what is missing, then runs ``hub_upload`` (the Hugging Face Hub repository).

Runs are recorded in a persistent Dagster instance, DAGSTER_HOME (default
``<output>/dagster_home``), so ``dagster dev`` with the same DAGSTER_HOME shows them afterwards.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from imagenet_int8_assets.stages import CLASS_STEPS, DATASET_STEPS, MANIFEST_STEPS, PUBLISH_STEPS


class _RunProgress:
    """Advances a tqdm bar for every asset materialization recorded for one run.

    Each poll reads only the materializations recorded since the last one (a cursor): reading all of
    a run's every second cost about 0.3 ms per materialization per poll, growing with the run."""

    def __init__(self, instance, run_id: str, bar):
        self.instance, self.run_id, self.bar = instance, run_id, bar
        self.cursor: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _new(self) -> int:
        from dagster import DagsterEventType

        connection = self.instance.get_records_for_run(
            self.run_id, cursor=self.cursor, of_type=DagsterEventType.ASSET_MATERIALIZATION
        )
        self.cursor = connection.cursor
        return len(connection.records)

    def _update(self) -> None:
        try:
            new = self._new()
        except Exception:  # the run may not exist yet; progress is best-effort
            return
        if new:
            self.bar.update(new)

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            self._update()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._update()


def error_text(error) -> str:
    """The innermost cause of a Dagster SerializableErrorInfo (the user's actual error).

    A ``dagster.Failure`` (a step's own one-line message: settings, nothing to build, disk full)
    is shown without its class name."""
    while error is not None and error.cause is not None:
        error = error.cause
    if error is None:
        return "failed"
    return error.message.strip().removeprefix("dagster._core.definitions.events.Failure: ")


def failure_lines(events) -> list[str]:
    """What went wrong in a run, one line each: failed steps (their innermost error) and failed
    checks, from its DagsterEvents."""
    lines = []
    for event in events:
        if event.event_type_value == "STEP_FAILURE":
            lines.append(f"{event.step_key}: {error_text(event.event_specific_data.error)}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION" and not event.event_specific_data.passed:
            data = event.event_specific_data
            lines.append(f"check {data.check_name} failed: {data.description or ''}")
    return lines


def _failures(result) -> list[str]:
    return failure_lines(result.all_events)


def build(
    settings,
    partitions_per_run: int | None,
    verbose: bool = False,
    force: bool = False,
    publish: bool = False,
    runs_at_once: int | None = None,
) -> int:
    """Materialize what is missing or stale under the output's build lock; returns an exit code.

    A second build (or demo) of an output that is being built is refused at once with exit code 2
    and a message naming the running one; the lock dies with its process, so a killed build never
    blocks the next one. Nothing touches the Dagster instance before the lock is held.
    """
    from imagenet_int8_assets.core.build_lock import BUILD_LOCK_VAR, BuildLockBusy, BuildLockError, hold_build_lock
    from imagenet_int8_assets.instance import InstanceSettingError

    try:
        with hold_build_lock(settings.output_path):
            os.environ[BUILD_LOCK_VAR] = str(settings.output_path)  # this build's runs: the lock is held
            try:
                return _build_locked(settings, partitions_per_run, verbose, force, publish, runs_at_once)
            finally:
                os.environ.pop(BUILD_LOCK_VAR, None)
    except (BuildLockBusy, BuildLockError, InstanceSettingError) as exc:
        print(f"imagenet-int8: {exc}", file=sys.stderr)
        return 2


def _build_locked(
    settings, partitions_per_run: int | None, verbose: bool, force: bool, publish: bool, runs_at_once: int | None
) -> int:
    from dagster import AssetKey, DagsterInstance
    from dagster._core.utils import make_new_run_id
    from tqdm import tqdm

    from imagenet_int8_assets.assets.manifest import read_source_classes
    from imagenet_int8_assets.build_plan import plan_build
    from imagenet_int8_assets.class_runs import (
        ClassRuns,
        class_batches,
        default_runs_at_once,
        expected_batches,
        runs_at_once_limit,
        warm_imports,
    )
    from imagenet_int8_assets.dead_runs import fail_dead_build_runs, process_run_tags
    from imagenet_int8_assets.definitions import build_definitions
    from imagenet_int8_assets.instance import prepare_dagster_home
    from imagenet_int8_assets.partitions import partition_order
    from imagenet_int8_assets.resources import max_partitions_per_run

    home = prepare_dagster_home(settings.output_path / "dagster_home")
    with DagsterInstance.get() as instance:
        dead = fail_dead_build_runs(instance)
    if dead:
        print(
            f"Marked {len(dead)} run(s) left unfinished by imagenet-int8 builds whose process died as "
            f"failed: {', '.join(dead)}",
            flush=True,
        )
    if force:
        settings.record_settings(replace=True)  # --force rebuilds everything with these settings
    # process tags let the next build (or the UI's sensor) fail our runs if we die; the daemon cannot
    # re-execute runs executed in this process, so they say they are not retried
    own_tags = {**process_run_tags(), "dagster/max_retries": "0"}
    per_run = partitions_per_run or max_partitions_per_run()
    defs = build_definitions(settings, per_run)
    job = defs.resolve_implicit_global_asset_job_def()
    run_config = {"loggers": {"console": {"config": {"log_level": "INFO" if verbose else "WARNING"}}}}
    print(
        f"Building from {settings.source_path()} into {settings.output_path}\n"
        f"VAE {settings.vae!r}; Dagster instance: DAGSTER_HOME={home}",
        flush=True,
    )
    failures: list[str] = []
    with DagsterInstance.get() as instance, tqdm(total=1, unit="step", dynamic_ncols=True) as bar:

        def run(selection: Sequence[str], tags: dict[str, str] | None = None) -> bool:
            run_id = make_new_run_id()
            with _RunProgress(instance, run_id, bar):
                result = job.execute_in_process(
                    run_config=run_config,
                    instance=instance,
                    asset_selection=[AssetKey(k) for k in selection],
                    tags={**own_tags, **(tags or {})},
                    run_id=run_id,
                    raise_on_error=False,
                )
            problems = _failures(result)
            if problems or not result.success:
                failures.extend([f"run {run_id}:"] + [f"  {p}" for p in problems or ["failed"]])
            return result.success

        # class runs in processes of their own (a GPU node: devices + 1 at once), the first ones
        # started now, so that their imports and VAE load overlap with the manifest run's scan
        at_once = runs_at_once or default_runs_at_once(settings)
        class_runs = None
        if at_once > 1:

            def describe(done: int, running: int, total: int) -> None:
                bar.set_description(f"class runs {done}/{total} done, {running} running")

            # started before the scan: no more than a build of every class folder needs, or memory holds
            early, _ = runs_at_once_limit(settings, at_once, expected_batches(settings, per_run))
            class_runs = ClassRuns(
                instance, settings, per_run, early, run_config, own_tags,
                progress=lambda run_id: _RunProgress(instance, run_id, bar), describe=describe,
            )
            class_runs.prestart(early)
        try:
            bar.set_description("manifest")
            if run(MANIFEST_STEPS) and _usable_images(settings, failures):
                plan = plan_build(instance, defs, settings, read_source_classes(settings)["classes"], force)
                batches = class_batches(partition_order(instance), plan.classes, per_run)
                bar.total = 1 + len(CLASS_STEPS) * len(plan.classes) + (len(DATASET_STEPS) if plan.dataset else 0) + publish
                bar.refresh()
                tqdm.write(plan.describe(per_run, len(batches)))
                if class_runs is not None and batches:
                    class_runs.runs_at_once, note = runs_at_once_limit(settings, at_once, len(batches))
                    if note:
                        tqdm.write(note)
                    tqdm.write(f"Class runs: up to {class_runs.runs_at_once} at once, each in its own process.")
                    warming = warm_imports()  # the dataset run's imports, while the class runs encode
                    failures += class_runs.run(batches)
                    warming.join()
                else:  # one at a time: in this process, as the other runs (no process start per run)
                    for n, batch in enumerate(batches, 1):
                        bar.set_description(f"classes {n}/{len(batches)}")
                        run(
                            CLASS_STEPS,
                            {"dagster/asset_partition_range_start": batch[0], "dagster/asset_partition_range_end": batch[-1]},
                        )
                if class_runs is not None:
                    class_runs.close()  # those started for runs this build did not need
                if not failures and plan.dataset:
                    bar.set_description("dataset")
                    run(DATASET_STEPS)
                if publish and failures:
                    failures.append("hub_upload: not run, nothing was published (the build above did not finish)")
                elif publish:
                    bar.set_description("publish")
                    run(PUBLISH_STEPS)
        finally:
            if class_runs is not None:
                class_runs.close()
    if failures:
        print("\nThe build did not finish:\n" + "\n".join(failures), file=sys.stderr)
        print(
            f"Fix the cause and run the same command again (classes already built are not redone). "
            f"Full logs: {_ui_command(settings, home)}",
            file=sys.stderr,
        )
        return 1
    return 0


def _usable_images(settings, failures: list[str]) -> bool:
    """After the manifest: False, with the "no usable images" message in ``failures``, when there
    is nothing to build (the build then stops instead of failing in later steps)."""
    from dagster import Failure

    from imagenet_int8_assets.assets.manifest import COUNT_COLUMNS, read_manifest, require_usable_images

    try:
        require_usable_images(read_manifest(settings, COUNT_COLUMNS))
    except Failure as exc:
        failures.append(f"  {exc.description}")
        return False
    return True


def _summary(settings) -> str:
    import json

    from imagenet_int8_assets.core.storage import manifest_path, mds_root

    root = mds_root(settings.output_path)
    info = json.loads((root / "build.json").read_text())
    import pandas as pd

    manifest = pd.read_parquet(manifest_path(settings.output_path))
    counts = manifest["status"].value_counts().to_dict()
    vae = info["vae"]
    remote = ""
    if settings.mds_remote:  # "published" only when the bucket serves this index (one GET)
        from imagenet_int8_assets.core.mds_remote import RemoteError, RemoteMds
        from imagenet_int8_assets.core.urls import redact_url

        shown = redact_url(settings.mds_remote)
        try:
            same = RemoteMds(settings.mds_remote).holds_index(root)
            why = "the bucket's index.json is not this dataset's; run the same command again to publish it"
        except RemoteError as exc:
            same, why = False, str(exc)
        remote = f" (published to {shown} too)" if same else f" (NOT published to {shown}: {why})"
    lines = [
        "",
        f"Dataset: {root}" + remote,
        f"  {info['samples']} samples in {len(info['per_class'])} classes; manifest: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "bad", "skipped")),
        f"  VAE {vae['requested']} ({vae['source']}), latents {tuple(info['latent_shape'])} "
        f"({info['latent_value']}, {info['precision']}), {info['dequantize']}",
    ]
    if vae.get("fallback_reason"):
        lines.append(
            f"  WARNING: real VAE weights were not available, so this demo used RANDOM weights "
            f"({settings.vae_fallback}): the pipeline is real, the latents are not meaningful."
        )
    report = settings.output_path / "report"
    summary = json.loads((report / "summary.json").read_text())
    lines += [
        f"Reconstruction report: {report / 'report.html'} (PSNR from float {summary['psnr_float']:.2f} dB, "
        f"from uint8 {summary['psnr_uint8']:.2f} dB, grid: {report / 'grid.png'})",
        f"Latent probe: {settings.output_path / 'probe' / 'report' / 'report.html'}",
    ]
    lines += [
        "",
        "Read it:",
        "  " + _read_command(root),
        "See the runs and assets in the UI:",
        "  " + _ui_command(settings, os.environ["DAGSTER_HOME"]),
    ]
    return "\n".join(lines)


READ_CODE = (
    "import sys; from imagenet_int8_assets.reader import open_dataset; ds = open_dataset(sys.argv[1]); "
    's = ds[0]; print(len(ds), s["latent"].shape, s["label"], s["label_as_text"])'
)


def _read_command(root: Path) -> str:
    """A shell command that opens the dataset at ``root`` (quoted: valid for any path)."""
    return " ".join(shlex.quote(str(a)) for a in (sys.executable, "-c", READ_CODE, root))


def _settings_env(settings, changed_only: bool = False) -> dict[str, str]:
    """The IMAGENET_INT8_* values that reproduce ``settings`` (output and source always; with
    ``changed_only`` the rest only where they differ from the default)."""
    from imagenet_int8_assets.resources import ENV

    env = {ENV["output"]: str(settings.output_path)}
    env[ENV["source"]] = settings.source if settings.is_sample else str(Path(settings.source).expanduser().resolve())
    for name, var in ENV.items():
        field = type(settings).model_fields.get(name)
        if field is None or name in ("source", "output"):
            continue
        value = getattr(settings, name)
        if not changed_only or value != field.default:
            env[var] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def _ui_command(settings, home) -> str:
    """``dagster dev`` with this build's DAGSTER_HOME and every non-default setting, quoted for a shell."""
    env = {"DAGSTER_HOME": str(home), **_settings_env(settings, changed_only=True)}
    assignments = [f"{var}={shlex.quote(value)}" for var, value in env.items()]
    dagster = shlex.quote(str(Path(sys.executable).parent / "dagster"))
    return " ".join([*assignments, dagster, "dev", "-m", "imagenet_int8_assets"])


def _disk_full_message(exc: BaseException, output: Path) -> str | None:
    """One line for a build stopped by a full disk outside any step (the Dagster instance's SQLite
    files, the output), or None when ``exc`` has another cause."""
    import sqlite3

    from imagenet_int8_assets.assets.disk_space import disk_full_error, free_bytes, human_bytes

    error = disk_full_error(exc)
    if error is None:
        return None
    again = "and run the same command again: it completes the build."
    if isinstance(error, sqlite3.Error):
        home = Path(os.environ.get("DAGSTER_HOME") or ".")
        free = free_bytes(home)
        return (
            f"the Dagster instance at DAGSTER_HOME={home} could not be written (SQLite: {error}); "
            f"{human_bytes(free) if free is not None else 'unknown space'} free there, so its disk is probably full. "
            f"Free space there (or set DAGSTER_HOME to a folder on another disk) {again}"
        )
    where = Path(error.filename) if getattr(error, "filename", None) else output
    free = free_bytes(where)
    return (
        f"disk full while writing {where}: {error.strerror or error}; "
        f"{human_bytes(free) if free is not None else 'unknown space'} free there. Free space {again}"
    )


def presets_table() -> str:
    """The VAE presets and their declared properties, as a text table."""
    from imagenet_int8_assets.core.vae import PRESETS

    rows = [p.describe() for p in PRESETS.values()]
    columns = ["name", "channels", "downsample", "posterior", "scaling", "shift", "range", "weights"]
    cells = [[("-" if row[c] is None else str(row[c])) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    lines += ["", "Input range of every preset: [-1, 1]. Stored latents are raw (scaling/shift are recorded only)."]
    lines += [f"{row['name']}: {row['description']}" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagenet-int8", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="list the VAE presets and their properties")
    for name, help_text in (
        ("build", "materialize the whole graph for every class (settings from IMAGENET_INT8_* or flags)"),
        ("demo", "build the bundled sample dataset (falls back to random SDXL weights when offline)"),
        ("publish", "build what is missing, then publish the dataset to a Hugging Face Hub repository (hub_upload)"),
    ):
        p = sub.add_parser(name, help=help_text)
        if name in ("build", "publish"):
            p.add_argument("--source", help="dataset root (IMAGENET_INT8_SOURCE)")
        if name == "publish":
            p.add_argument("--repo", help="Hub dataset repository owner/name (IMAGENET_INT8_HUB_REPO); token from HF_TOKEN")
            p.add_argument("--revision", help="branch to publish to (IMAGENET_INT8_HUB_REVISION, default main)")
            p.add_argument("--public", action="store_true", help="create the repository public (default private)")
            p.add_argument("--message", help="commit message (IMAGENET_INT8_HUB_COMMIT_MESSAGE)")
            p.add_argument("--license", help="license id in the card (IMAGENET_INT8_HUB_LICENSE)")
            p.add_argument("--no-parquet", action="store_true", help="do not export parquet (IMAGENET_INT8_PARQUET_EXPORT=false)")
            p.add_argument("--files-per-commit", type=int, help="most files per commit (IMAGENET_INT8_HUB_FILES_PER_COMMIT)")
            p.add_argument(
                "--allow-random-weights", action="store_true",
                help="publish even though the VAE had random weights (IMAGENET_INT8_PUBLISH_RANDOM_WEIGHTS)",
            )
        p.add_argument("--output", help="output root (IMAGENET_INT8_OUTPUT)")
        p.add_argument("--vae", help="VAE preset, Hub id or folder (IMAGENET_INT8_VAE)")
        p.add_argument("--device", help="auto, cpu or cuda (IMAGENET_INT8_DEVICE)")
        p.add_argument("--batch-size", type=int, help="images per forward pass (IMAGENET_INT8_BATCH_SIZE)")
        p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="encode precision (IMAGENET_INT8_PRECISION)")
        p.add_argument("--workers", type=int, help="processes for scan and crops (IMAGENET_INT8_WORKERS)")
        p.add_argument(
            "--max-partitions-per-run", type=int, help="classes per batched run (IMAGENET_INT8_MAX_PARTITIONS_PER_RUN)"
        )
        p.add_argument(
            "--runs-at-once", type=int,
            help="class runs executed at once, each in its own process (default: the number of devices + 1)",
        )
        p.add_argument(
            "--force", action="store_true",
            help="rebuild every class and the dataset, and record the current settings for the output",
        )
        p.add_argument("-v", "--verbose", action="store_true", help="show Dagster INFO logs")
    args = parser.parse_args(argv)
    if args.command == "presets":
        print(presets_table())
        return 0

    from imagenet_int8_assets.core.sources import SourceError
    from imagenet_int8_assets.core.vae import RANDOM_PRESETS
    from imagenet_int8_assets.instance import dagster_home_path
    from imagenet_int8_assets.resources import (
        SAMPLE_SOURCE,
        ImagenetInt8Settings,
        SettingsError,
        max_partitions_per_run,
    )

    overrides: dict = {
        "source": getattr(args, "source", None),
        "output": args.output,
        "vae": args.vae,
        "device": args.device,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "workers": args.workers,
    }
    if args.command == "publish":
        overrides.update(
            hub_repo=args.repo,
            hub_revision=args.revision,
            hub_private=False if args.public else None,
            hub_commit_message=args.message,
            hub_license=args.license,
            parquet_export=False if args.no_parquet else None,
            hub_files_per_commit=args.files_per_commit,
            publish_random_weights=True if args.allow_random_weights else None,
        )
    if args.command == "demo":
        fallback = os.environ.get("IMAGENET_INT8_DEMO_VAE_FALLBACK", "").strip() or "sdxl-random"
        if fallback not in RANDOM_PRESETS:
            print(
                f"imagenet-int8: IMAGENET_INT8_DEMO_VAE_FALLBACK={fallback!r} must be one of "
                + ", ".join(RANDOM_PRESETS),
                file=sys.stderr,
            )
            return 2
        overrides.update(source=SAMPLE_SOURCE, vae_fallback=fallback)
        if not os.environ.get("IMAGENET_INT8_REPORT_PER_CLASS"):
            overrides["report_per_class"] = 1  # keeps the report quick with a full SDXL decoder on a CPU
    settings = None
    try:  # every setting is checked before any work starts (exit code 2, one line)
        settings = ImagenetInt8Settings.from_env(**overrides)
        if args.max_partitions_per_run is not None and args.max_partitions_per_run <= 0:
            raise SettingsError(
                f"--max-partitions-per-run={args.max_partitions_per_run}: use a positive number of classes."
            )
        max_partitions_per_run()
        if args.runs_at_once is not None and args.runs_at_once <= 0:
            raise SettingsError(f"--runs-at-once={args.runs_at_once}: use a positive number of runs.")
        if args.command == "publish" and not settings.hub_repo:
            raise SettingsError(
                "imagenet-int8 publish needs a Hub dataset repository: --repo owner/name or IMAGENET_INT8_HUB_REPO "
                "(and HF_TOKEN set to a token with write access)."
            )
        settings.preflight(dagster_home_path(settings.output_path / "dagster_home"))
        if not args.force:
            settings.require_recorded_settings()
        # Flags become the environment: loading the definitions module (which builds its default
        # Definitions from IMAGENET_INT8_*) then sees this build's source and output, not others.
        os.environ.update(_settings_env(settings))
        code = build(
            settings, args.max_partitions_per_run, args.verbose, args.force, args.command == "publish", args.runs_at_once
        )
    except (SettingsError, SourceError) as exc:
        print(f"imagenet-int8: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        message = _disk_full_message(exc, settings.output_path if settings is not None else Path.cwd())
        if message is None:
            raise
        print(f"imagenet-int8: {message}", file=sys.stderr)
        return 1
    if code == 0:
        print(_summary(settings))
        if args.command == "publish":
            print(_publish_summary())
    return code


def _publish_summary() -> str:
    """What the last hub_upload did, from its materialization's metadata (its URLs without credentials,
    also in metadata recorded by an older version)."""
    from dagster import AssetKey, DagsterInstance

    from imagenet_int8_assets.core.urls import redact_urls

    with DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(AssetKey("hub_upload"))
    meta = event.asset_materialization.metadata
    return f"Published: {redact_urls(meta['summary'].value)}"


def run() -> None:
    """The ``imagenet-int8`` command: :func:`main`, then a prompt exit with its code.

    Once ``main`` has returned, every result is on disk and every line printed; the exit handlers
    run and the output is flushed, then the process ends with ``os._exit``, skipping the C++
    static destructors. pyarrow (pandas' parquet reader) can abort in those with "terminate called
    without an active exception" (apache/arrow#34314, open): measured here, 3 in 40 builds that
    had done everything right ended with SIGABRT. An exception still ends the normal way.
    """
    import atexit

    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
