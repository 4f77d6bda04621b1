"""What each class stage occupies on disk (crops, latents, the classes' current MDS versions)."""

from __future__ import annotations

import json
import os

from imagenet_int8_assets.core.common.files import bytes_per_image, folder_bytes
from imagenet_int8_assets.core.common.layout import crops_dir, latents_dir, mds_root
from imagenet_int8_assets.core.dataset import mds_index

FOOTPRINT_STAGES = ("crops", "latents", "shards")


def disk_footprint(output: str | os.PathLike, classes: list[str]) -> dict[str, dict]:
    """What each class stage occupies over ``classes``: per stage (crops, latents, the classes'
    current MDS versions) the files' ``bytes``, the ``images`` they hold and ``bytes_per_image``.
    Missing partitions count as 0."""
    totals = {stage: {"bytes": 0, "images": 0} for stage in FOOTPRINT_STAGES}
    for name in classes:
        for stage, folder in (("crops", crops_dir(output, name)), ("latents", latents_dir(output, name))):
            try:
                count = int(json.loads((folder / "meta.json").read_text(encoding="utf-8")).get("count", 0))
            except (OSError, ValueError):
                continue
            totals[stage]["bytes"] += folder_bytes(folder)
            totals[stage]["images"] += count
        try:
            version = mds_index.current_version_dir(mds_root(output), name)
            count = mds_index.index_sample_count(mds_index.read_index(version))
        except (OSError, ValueError, KeyError):
            continue
        totals["shards"]["bytes"] += folder_bytes(version)
        totals["shards"]["images"] += count
    for value in totals.values():
        value["bytes_per_image"] = bytes_per_image(value["bytes"], value["images"])
    return totals
