"""The one Definitions object (used by workspace.yaml, `dagster dev` and `dagster asset materialize`).

Partitions are the class folders found under the source when this module loads; settings come
from IMAGENET_INT8_* environment variables (see resources.py and the README).
"""

from __future__ import annotations

import warnings

from dagster import BackfillPolicy, BetaWarning, Definitions, PreviewWarning, in_process_executor

from imagenet_int8_assets.assets.crops import build_crops_asset
from imagenet_int8_assets.assets.latents import build_latents_assets
from imagenet_int8_assets.assets.manifest import raw_manifest
from imagenet_int8_assets.assets.probe import build_probe_assets
from imagenet_int8_assets.assets.quantization import build_quantization_asset
from imagenet_int8_assets.assets.report import build_report_assets
from imagenet_int8_assets.assets.shards import build_shards_assets
from imagenet_int8_assets.dead_runs import dead_build_runs_sensor
from imagenet_int8_assets.partitions import class_partitions
from imagenet_int8_assets.resources import ImagenetInt8Settings, max_partitions_per_run


def build_definitions(
    settings: ImagenetInt8Settings | None = None, partitions_per_run: int | None = None
) -> Definitions:
    settings = settings if settings is not None else ImagenetInt8Settings.from_env()
    partitions = class_partitions(settings)
    policy = BackfillPolicy.multi_run(partitions_per_run or max_partitions_per_run())
    with warnings.catch_warnings():
        # backfill policies and partitioned checks are marked beta/preview in 1.13; we pin it
        warnings.simplefilter("ignore", BetaWarning)
        warnings.simplefilter("ignore", PreviewWarning)
        crops = build_crops_asset(partitions, policy)
        latents, latents_check = build_latents_assets(partitions, policy)
        stats = build_quantization_asset(partitions)
        shards, shards_check, dataset = build_shards_assets(partitions, policy)
        report, report_check = build_report_assets(partitions)
        probe_features, latent_probe = build_probe_assets(partitions)
    return Definitions(
        assets=[raw_manifest, crops, latents, stats, shards, dataset, report, probe_features, latent_probe],
        asset_checks=[latents_check, shards_check, report_check],
        resources={"settings": settings},
        # fails the runs of killed `imagenet-int8 build` processes, which would hold the gpu pool
        sensors=[dead_build_runs_sensor],
        # The steps of a run are sequential; one process per run pays the heavy imports (torch,
        # streaming) once instead of once per step, and shares nothing it should not.
        executor=in_process_executor,
    )


defs = build_definitions()
