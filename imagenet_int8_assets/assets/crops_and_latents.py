"""preprocessed_crops and vae_latents: two assets, one step.

Materialized together (every build, backfill and automation run), the crops are made once: worker
processes decode and crop each class from the source while the VAE encodes the crops they made
(core.latents.pipeline.encode_stream), and each class's crops and latents are written as soon as it is
encoded. Either asset alone is still a valid selection (``can_subset``): the crops alone are
cropped and written (to change how they are kept, say); the latents alone are encoded from the
stored crops, which are read, or recomputed from the source and verified against their hashes.
"""

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    BackfillPolicy,
    MaterializeResult,
    multi_asset,
)

from imagenet_int8_assets.assets.crops import CROPS_DESCRIPTION, crop_classes
from imagenet_int8_assets.assets.latents import LATENTS_DESCRIPTION, encode_classes
from imagenet_int8_assets.assets.manifest import raw_manifest, source_class_files
from imagenet_int8_assets.assets.metadata import DATASET_GROUP
from imagenet_int8_assets.build.instance import GPU_POOL
from imagenet_int8_assets.partitions import class_partitions
from imagenet_int8_assets.resources import DEFAULT_MAX_PARTITIONS_PER_RUN, ImagenetInt8Settings

CROPS, LATENTS = AssetKey("preprocessed_crops"), AssetKey("vae_latents")


@multi_asset(
    name="crops_and_latents",
    specs=[
        AssetSpec(
            CROPS, deps=[raw_manifest, source_class_files], group_name=DATASET_GROUP, kinds={"numpy"},
            description=CROPS_DESCRIPTION, skippable=True,
        ),
        AssetSpec(
            LATENTS, deps=[CROPS], group_name=DATASET_GROUP, kinds={"pytorch"}, description=LATENTS_DESCRIPTION,
            skippable=True,
        ),
    ],
    partitions_def=class_partitions,
    backfill_policy=BackfillPolicy.multi_run(DEFAULT_MAX_PARTITIONS_PER_RUN),
    can_subset=True,
    # the run holds the gpu pool (one run per device) whichever of the two it materializes
    pool=GPU_POOL,
)
def crops_and_latents(context: AssetExecutionContext, settings: ImagenetInt8Settings):
    selected = context.selected_asset_keys
    if LATENTS in selected:
        encode_classes(context, settings, crop_too=CROPS in selected)
    else:
        crop_classes(context, settings)
    # the crops' materialization first: the latents record the crops' new data version as input
    for key in (CROPS, LATENTS):
        if key in selected:
            yield MaterializeResult(asset_key=key)
