"""The Dagster layer: one module per stage, named after its asset; checks beside their assets."""

import warnings

# Backfill policies and partitioned checks are marked beta/preview in Dagster 1.13, which we pin:
# silence exactly those notices (and observable_source_asset, beta too) (raised while the asset modules are imported), nothing else.
warnings.filterwarnings("ignore", message=r"Parameter `backfill_policy` of function `asset`")
warnings.filterwarnings("ignore", message=r"Specifying a partitions_def on an AssetCheckSpec")
warnings.filterwarnings("ignore", message=r"Function `observable_source_asset` is currently in beta")
