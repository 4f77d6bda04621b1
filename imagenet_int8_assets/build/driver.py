"""``imagenet-int8 build``, ``demo`` and ``publish`` without their argument parsing (``cli``).

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

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from imagenet_int8_assets.build.run_events import RunProgress, failure_lines, run_failure_block
from imagenet_int8_assets.build.stages import CLASS_STEPS, DATASET_STEPS, MANIFEST_STEPS, PUBLISH_STEPS


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
    from imagenet_int8_assets.core.common.build_lock import (
        BUILD_LOCK_VAR,
        BuildLockBusy,
        BuildLockError,
        hold_build_lock,
    )
    from imagenet_int8_assets.build.instance import InstanceSettingError

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

    from imagenet_int8_assets.core.source.manifest import read_source_classes
    from imagenet_int8_assets.build.plan import plan_build
    from imagenet_int8_assets.build.class_runs import (
        ClassRuns,
        class_batches,
        default_runs_at_once,
        expected_batches,
        runs_at_once_limit,
        warm_imports,
    )
    from imagenet_int8_assets.build.dead_runs import fail_dead_build_runs, process_run_tags
    from imagenet_int8_assets.definitions import build_definitions
    from imagenet_int8_assets.build.instance import prepare_dagster_home
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
            with RunProgress(instance, run_id, bar):
                result = job.execute_in_process(
                    run_config=run_config,
                    instance=instance,
                    asset_selection=[AssetKey(k) for k in selection],
                    tags={**own_tags, **(tags or {})},
                    run_id=run_id,
                    raise_on_error=False,
                )
            failures.extend(run_failure_block(run_id, _failures(result), result.success))
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
                progress=lambda run_id: RunProgress(instance, run_id, bar), describe=describe,
            )
            class_runs.prestart(early)
        try:
            bar.set_description("manifest")
            if run(MANIFEST_STEPS) and _usable_images(settings, failures):
                plan = plan_build(instance, defs, settings, read_source_classes(settings.output_path)["classes"], force)
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
    from imagenet_int8_assets.core.source.manifest import (
        COUNT_COLUMNS,
        ManifestRefusal,
        read_manifest,
        require_usable_images,
    )

    try:
        require_usable_images(read_manifest(settings.output_path, COUNT_COLUMNS))
    except ManifestRefusal as exc:
        failures.append(f"  {exc}")
        return False
    return True


def _summary(settings) -> str:
    import json

    from imagenet_int8_assets.core.common.layout import manifest_path, mds_root

    root = mds_root(settings.output_path)
    info = json.loads((root / "build.json").read_text())
    import pandas as pd

    manifest = pd.read_parquet(manifest_path(settings.output_path))
    counts = manifest["status"].value_counts().to_dict()
    vae = info["vae"]
    remote = ""
    if settings.mds_remote:  # "published" only when the bucket serves this index (one GET)
        from imagenet_int8_assets.core.dataset.mds_remote import RemoteError, RemoteMds
        from imagenet_int8_assets.core.common.urls import redact_url

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
    """``dagster dev`` with this build's DAGSTER_HOME, every non-default setting and a non-default
    number of classes per batched run (the UI's backfill policy), quoted for a shell."""
    from imagenet_int8_assets.resources import DEFAULT_MAX_PARTITIONS_PER_RUN, PARTITIONS_PER_RUN_VAR
    from imagenet_int8_assets.resources import max_partitions_per_run

    env = {"DAGSTER_HOME": str(home), **_settings_env(settings, changed_only=True)}
    per_run = max_partitions_per_run()
    if per_run != DEFAULT_MAX_PARTITIONS_PER_RUN:
        env[PARTITIONS_PER_RUN_VAR] = str(per_run)
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


def _publish_summary() -> str:
    """What the last hub_upload did, from its materialization's metadata (its URLs without credentials,
    also in metadata recorded by an older version)."""
    from dagster import AssetKey, DagsterInstance

    from imagenet_int8_assets.core.common.urls import redact_urls

    with DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(AssetKey("hub_upload"))
    meta = event.asset_materialization.metadata
    return f"Published: {redact_urls(meta['summary'].value)}"
