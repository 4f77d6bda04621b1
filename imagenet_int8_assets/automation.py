"""What runs without anyone clicking: the class-folder sensor, the build automation, the refresh schedule.

Defaults that cannot start a GPU job unexpectedly (docs/OPERATING.md: "Automation and the schedule"):

- ``class_folders`` (sensor, RUNNING): registers new class folders as partitions within one
  interval and requests a ``raw_manifest`` run (a CPU scan). It never requests GPU work itself.
- ``build_automation`` (declarative automation, STOPPED unless IMAGENET_INT8_AUTOMATION=true):
  the only thing that launches encoding on its own. Missing, changed (new data version of a
  class's files) and re-versioned (settings changed) class partitions are materialized end to
  end, through backfills that keep the ``BackfillPolicy.multi_run`` batching and the ``gpu``
  pool; the merged dataset, statistics, report and probe follow once no class is missing or in
  progress. At each tick of the refresh cron it also retries missing or failed partitions.
- ``refresh_source`` (schedule, STOPPED; cron IMAGENET_INT8_REFRESH_CRON, default every day at
  03:00): rescans the source (``raw_manifest``), which records new data versions for changed
  classes; with ``build_automation`` on, those are rebuilt.
"""

from __future__ import annotations

import hashlib

from dagster import (
    AssetKey,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleDefinition,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from imagenet_int8_assets.partitions import class_partitions, registered_classes
from imagenet_int8_assets.resources import ImagenetInt8Settings

MANIFEST_KEY = AssetKey("raw_manifest")
MANIFEST = AssetSelection.assets(MANIFEST_KEY)
SOURCE_FILES = AssetSelection.assets("source_class_files")


def partition_condition(cron: str) -> AutomationCondition:
    """For a class partition: build it when it is new (newly missing), when an upstream partition
    got a new version (its files changed, or the stage before was rebuilt) or when its code
    version changed (a setting that decides its bytes); at each refresh-cron tick also when it is
    missing or its last run failed. Never while an upstream partition is missing or in progress.
    A rescan alone (a new raw_manifest materialization) triggers nothing: classes react only to
    their own files' data versions."""
    ac = AutomationCondition
    trigger = (
        ac.newly_missing()
        | ac.any_deps_updated().ignore(MANIFEST)
        | ac.code_version_changed()
        | (ac.cron_tick_passed(cron) & (ac.missing() | ac.execution_failed()))
    ).since_last_handled()
    return (
        trigger & ~ac.any_deps_missing().ignore(SOURCE_FILES) & ~ac.any_deps_in_progress() & ~ac.in_progress()
    ).with_label("new, changed or missing class")


def dataset_condition(cron: str) -> AutomationCondition:
    """For the whole-dataset assets: rebuild when any class was rebuilt, when missing or
    re-versioned, once no class partition is missing or in progress."""
    ac = AutomationCondition
    trigger = (
        ac.newly_missing()
        | ac.any_deps_updated()
        | ac.code_version_changed()
        | (ac.cron_tick_passed(cron) & (ac.missing() | ac.execution_failed()))
    ).since_last_handled()
    return (trigger & ~ac.any_deps_missing() & ~ac.any_deps_in_progress() & ~ac.in_progress()).with_label(
        "after the classes change"
    )


def build_automation_sensor(settings: ImagenetInt8Settings) -> AutomationConditionSensorDefinition:
    return AutomationConditionSensorDefinition(
        "build_automation",
        target=AssetSelection.all() - MANIFEST - SOURCE_FILES,
        default_status=DefaultSensorStatus.RUNNING if settings.automation else DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=settings.sensor_interval,
        emit_backfills=True,
        description=(
            "Materializes new, changed and missing classes end to end (crops, latents on the GPU, shards), then the "
            "dataset, statistics, report and probe. Off unless IMAGENET_INT8_AUTOMATION=true or turned on here."
        ),
    )


def refresh_schedule(settings: ImagenetInt8Settings) -> ScheduleDefinition:
    return ScheduleDefinition(
        name="refresh_source",
        cron_schedule=settings.refresh_cron,
        target=MANIFEST,
        default_status=DefaultScheduleStatus.STOPPED,
        description=(
            "Rescans the source (raw_manifest: new class folders, changed files); build_automation then rebuilds what "
            "is stale or missing. Cron from IMAGENET_INT8_REFRESH_CRON."
        ),
    )


def class_folders_sensor(settings: ImagenetInt8Settings) -> SensorDefinition:
    """The ``class_folders`` sensor, evaluated every ``settings.sensor_interval`` seconds."""
    return sensor(
        name="class_folders",
        minimum_interval_seconds=settings.sensor_interval,
        default_status=DefaultSensorStatus.RUNNING,
        target=MANIFEST,
        description=(
            "Registers new class folders of the source as partitions and requests a raw_manifest scan (CPU). "
            "Reports vanished class folders, whose last build the dataset keeps."
        ),
    )(check_class_folders)


def check_class_folders(context: SensorEvaluationContext, settings: ImagenetInt8Settings):
    from imagenet_int8_assets.core.source.manifest import dataset_kept_classes
    from imagenet_int8_assets.core.source.sources import SourceError, find_class_folders

    source = settings.source_path()
    if not source.is_dir():
        if settings.source_is_generated:  # the bundled sample or a CIFAR-10 export: raw_manifest prepares it
            return RunRequest(run_key=f"prepare:{source}", asset_selection=[MANIFEST_KEY])
        return SkipReason(f"The source {source} does not exist (IMAGENET_INT8_SOURCE).")
    try:
        folders = find_class_folders(source).names
    except (SourceError, OSError) as exc:
        return SkipReason(f"Cannot list the class folders of {source}: {exc}")
    registered = registered_classes(context.instance)
    new = sorted(set(folders) - set(registered))
    vanished = dataset_kept_classes(settings.output_path, sorted(set(registered) - set(folders)))
    if vanished:
        context.log.warning(
            f"{len(vanished)} class folder(s) vanished from {source}: {', '.join(vanished[:20])}. The dataset keeps "
            "their last build; delete a partition to drop its class."
        )
    if not new:
        note = f"; vanished (kept in the dataset): {', '.join(vanished[:20])}" if vanished else ""
        return SkipReason(f"{len(folders)} class folder(s) in {source}, all registered{note}.")
    context.log.info(f"New class folder(s): {', '.join(new[:20])}{' ...' if len(new) > 20 else ''}")
    digest = hashlib.sha256("\0".join(new).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return SensorResult(
        run_requests=[RunRequest(run_key=f"classes:{digest}", asset_selection=[MANIFEST_KEY])],
        dynamic_partitions_requests=[class_partitions.build_add_request(new)],
    )
