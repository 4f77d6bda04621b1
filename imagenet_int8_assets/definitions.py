"""The one Definitions object (used by workspace.yaml, `dagster dev` and `dagster asset materialize`).

Loading it is fast and writes nothing: class partitions are dynamic (registered in the instance,
see partitions.py), the source is neither scanned nor prepared here. Settings come from the
IMAGENET_INT8_* environment variables and the output's recorded settings (resources.py); they
decide each asset's code version, the batching of class runs and the refresh cron.
"""

from __future__ import annotations

from dagster import AssetsDefinition, BackfillPolicy, Definitions, in_process_executor

from imagenet_int8_assets.assets.crops_and_latents import crops_and_latents
from imagenet_int8_assets.assets.latents import latents_are_finite
from imagenet_int8_assets.assets.manifest import raw_manifest, source_class_files
from imagenet_int8_assets.assets.probe import latent_probe, probe_features
from imagenet_int8_assets.assets.publish import hub_token_resource, hub_upload
from imagenet_int8_assets.assets.quantization import quantization_stats
from imagenet_int8_assets.assets.report import reconstruction_quality, reconstruction_report
from imagenet_int8_assets.assets.shards import mds_count_matches_manifest, mds_dataset, mds_shards
from imagenet_int8_assets.automation import (
    build_automation_sensor,
    class_folders_sensor,
    dataset_condition,
    partition_condition,
    refresh_schedule,
)
from imagenet_int8_assets.build.dead_runs import dead_build_runs_sensor
from imagenet_int8_assets.resources import (
    ImagenetInt8Settings,
    as_run_defaults,
    max_partitions_per_run,
    read_recorded_settings,
)

CLASS_ASSETS = (crops_and_latents, mds_shards)
DATASET_ASSETS = (quantization_stats, mds_dataset, reconstruction_report, probe_features, latent_probe)
CHECKS = (latents_are_finite, mds_count_matches_manifest, reconstruction_quality)


def configured(
    assets_def: AssetsDefinition, settings: ImagenetInt8Settings, policy: BackfillPolicy | None, condition
) -> AssetsDefinition:
    """The asset with the code version of ``settings``, its automation condition and, for class
    assets, the backfill policy (classes per run)."""
    spec_fn = lambda spec: spec.replace_attributes(  # noqa: E731
        code_version=settings.code_version(spec.key.to_user_string()), automation_condition=condition
    )
    updated = assets_def.map_asset_specs(spec_fn)
    return updated.with_attributes(backfill_policy=policy) if policy is not None else updated


def build_definitions(
    settings: ImagenetInt8Settings | None = None, partitions_per_run: int | None = None
) -> Definitions:
    settings = settings if settings is not None else ImagenetInt8Settings.from_env()
    policy = BackfillPolicy.multi_run(partitions_per_run or max_partitions_per_run())
    cron = settings.refresh_cron
    assets = [
        configured(raw_manifest, settings, None, None),
        source_class_files,
        *(configured(a, settings, policy, partition_condition(cron)) for a in CLASS_ASSETS),
        *(configured(a, settings, None, dataset_condition(cron)) for a in DATASET_ASSETS),
    ]
    if settings.hub_repo:  # never automated: publishing is a deliberate act (UI, `imagenet-int8 publish`).
        # Without a repository the asset is not in the graph at all: "Materialize all" then builds
        # everything there is and ends green (an asset that records nothing fails a backfill).
        assets.append(hub_upload)
    return Definitions(
        assets=assets,
        asset_checks=list(CHECKS),
        resources={"settings": as_run_defaults(settings), "hub_token": hub_token_resource()},
        schedules=[refresh_schedule(settings)],
        sensors=[
            class_folders_sensor(settings),
            build_automation_sensor(settings),
            # fails the runs of killed `imagenet-int8 build` processes, which would hold the gpu pool
            dead_build_runs_sensor,
        ],
        # The steps of a run are sequential; one process per run pays the heavy imports (torch,
        # streaming) once instead of once per step, and shares nothing it should not.
        executor=in_process_executor,
    )


def refusing_definitions(defs: Definitions, message: str) -> Definitions:
    """The graph of ``defs`` shown but not runnable: the code location's settings conflict with the
    output's record (``message`` says how). Every asset is kept as a non-executable spec (same key,
    lineage, partitions, group and code version, so nothing looks changed) whose description starts
    with the message, so the UI offers no "Materialize" and a launch is refused up front, before any
    run starts and without a traceback; the ``class_folders`` sensor skips with the message (the
    Automation page shows it); nothing else is automated."""
    from dagster import AssetSpec, DefaultSensorStatus, SkipReason, SourceAsset, sensor

    banner = f"**Not materializable: this code location's settings conflict with the output.** {message}"

    def specs_of(asset) -> list[AssetSpec]:
        if isinstance(asset, SourceAsset):  # source_class_files: observed by raw_manifest, never run
            return [
                AssetSpec(
                    asset.key, description=asset.description, partitions_def=asset.partitions_def,
                    group_name=asset.group_name, metadata=asset.metadata,
                )
            ]
        return list(asset.specs)

    specs = [
        spec.replace_attributes(description=f"{banner}\n\n{spec.description or ''}", automation_condition=None)
        for asset in defs.assets
        for spec in specs_of(asset)
    ]

    running = DefaultSensorStatus.RUNNING

    @sensor(name="class_folders", minimum_interval_seconds=60, description=banner, default_status=running)
    def refused(_context):  # each tick shows the message on the Automation page
        return SkipReason(message)

    return Definitions(assets=specs, sensors=[refused, dead_build_runs_sensor])


def location_definitions(settings: ImagenetInt8Settings | None = None) -> Definitions:
    """The code location's definitions (``dagster dev``, ``dagster asset materialize``): those of
    ``build_definitions``, or, when the settings conflict with the output's record, the same graph
    refusing every launch (``refusing_definitions``, the message also printed to stderr), with code
    versions of the recorded settings."""
    import sys

    settings = settings if settings is not None else ImagenetInt8Settings.from_env()
    message = settings.conflict_message()
    if message is None:
        return build_definitions(settings)
    print(f"imagenet-int8: {message}", file=sys.stderr, flush=True)
    recorded = settings.model_copy(update=read_recorded_settings(settings.output_path) or {})
    return refusing_definitions(build_definitions(recorded), message)


defs = location_definitions()
