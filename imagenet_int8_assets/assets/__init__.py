"""The Dagster layer: one module per stage, named after its asset; checks beside their assets."""
