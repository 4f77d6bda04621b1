"""Small helpers that turn results into Dagster metadata (markdown tables, progress logs)."""

from __future__ import annotations

import time
from collections.abc import Callable

from imagenet_int8_assets.core.common.tables import markdown_table  # noqa: F401 (the assets' table helper)

# The asset groups, each named once (users select them: `dagster asset materialize --select group:quality`).
DATASET_GROUP = "imagenet_int8"  # the class stages, quantization_stats and the MDS dataset
QUALITY_GROUP = "quality"  # the reconstruction report and its checks
PROBE_GROUP = "latent_probe"  # the linear probe and its features
PUBLISH_GROUP = "publish"  # the Hub upload


def progress_logger(
    log: Callable[[str], None], label: str, total: int | None = None, every_s: float = 10.0
):
    """A ``progress(done[, total])`` callback logging ``label: done/total (rate)`` every ``every_s``."""
    start = last = time.monotonic()
    fixed_total = total

    def progress(done: int, total: int | None = None) -> None:
        nonlocal last
        total = fixed_total if total is None else total
        now = time.monotonic()
        if done < total and now - last < every_s:
            return
        last = now
        rate = done / max(now - start, 1e-9)
        log(f"{label}: {done}/{total} ({rate:.1f}/s)")

    return progress


class PartitionMetadata:
    """``context.add_asset_metadata(metadata, partition_key=key)`` for the classes of a batched step.

    Dagster checks the key on every call by reading every dynamic partition from the instance
    (about 7 ms with hundreds of classes, three times per class in a build); this checks it against
    the step's partition keys read once, then records the metadata the same way.
    """

    def __init__(self, context, asset_key=None):
        from dagster import AssetKey

        self._context = context
        self._keys = frozenset(context.partition_keys)
        self._asset_key = AssetKey.from_coercible(asset_key) if asset_key is not None else context.assets_def.key

    def add(self, key: str, metadata: dict) -> None:
        if key not in self._keys:
            raise ValueError(f"partition {key!r} is not one of this step's {len(self._keys)} partition(s)")
        step = getattr(self._context, "_step_execution_context", None)
        accumulator = getattr(step, "_metadata_accumulator", None)
        if accumulator is None:  # another Dagster version: the public call, with its check
            self._context.add_asset_metadata(metadata, asset_key=self._asset_key, partition_key=key)
            return
        step._metadata_accumulator = accumulator.with_additional_asset_metadata(
            asset_key=self._asset_key, metadata=metadata, partition_key=key
        )
