"""What must hold before the per-class versions are published as one dataset (no Dagster import).

``check_publishable`` runs the checks in order and stops at the first that fails, raising
``NotPublishable`` whose message names the classes and what to do:

1. every class has a current version (mds_shards materialized);
2. every class was built with the same settings (``mds_index.inconsistent_classes``);
3. every counted class holds exactly its manifest's good images (classes that vanished from the
   source keep their last build and have no manifest rows, so they are not counted);
4. every shard of every current version is present, of its size and hash (``check_dataset``).

Each class's ``current.json`` is read once; the result names the version folders that passed, and
the dataset is merged from exactly those (``mds_index.merged_index(..., folders=)``): a class
re-made between the check and the merge cannot slip an unchecked version into the dataset.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.dataset.dataset_check import DatasetDamaged, check_dataset

SHOWN = 20  # classes named in one message


class NotPublishable(Exception):
    """The classes cannot be published as one dataset; the message says why and what to do."""


def count_rows(
    root: str | os.PathLike, manifest_ok: Mapping[str, int], keys: Sequence[str],
    versions: Mapping[str, Path] | None = None,
) -> list[dict]:
    """Per class: the manifest's good images (``manifest_ok``) against the samples in its MDS
    version (``versions[key]``, else its current one): ``{"partition", "manifest_ok", "mds_samples"}``."""
    return [
        {
            "partition": key,
            "manifest_ok": int(manifest_ok[key]),
            "mds_samples": mds_index.index_sample_count(
                mds_index.read_index(versions[key]) if versions else mds_index.read_class_index(root, key)
            ),
        }
        for key in keys
    ]


@dataclass(frozen=True)
class Publishable:
    """What ``check_publishable`` checked: each class's version folder (read once, from its
    ``current.json``) and its build info. Publish exactly these folders: a class re-made meanwhile
    (another run moving ``current.json``) is not in this dataset."""

    versions: dict[str, Path]
    infos: dict[str, dict]


def check_publishable(
    root: str | os.PathLike, keys: Sequence[str], manifest_ok: Mapping[str, int]
) -> Publishable:
    """Check ``keys``' current versions under ``root`` (see the module docstring). Each class's
    ``current.json`` is read once: every check, and the caller's merge, use those folders. Only
    classes in ``manifest_ok`` have their sample count compared."""
    versions, infos, missing = {}, {}, []
    for key in keys:
        try:
            versions[key] = mds_index.current_version_dir(root, key)
            infos[key] = mds_index.read_build_info(versions[key])
        except FileNotFoundError:
            versions.pop(key, None)
            missing.append(key)
    if missing:
        raise NotPublishable(
            f"mds_shards is not materialized for {len(missing)} class(es): {', '.join(missing[:SHOWN])}. "
            "Materialize those partitions (or run `imagenet-int8 build`)."
        )
    conflicts = mds_index.inconsistent_classes(infos)
    if conflicts:
        raise NotPublishable(
            "Classes were built with different settings and cannot form one dataset:\n- "
            + "\n- ".join(conflicts)
            + "\nRe-materialize the minority classes with the current settings."
        )
    counted = [key for key in keys if key in manifest_ok]
    mismatched = [
        r for r in count_rows(root, manifest_ok, counted, versions) if r["manifest_ok"] != r["mds_samples"]
    ]
    if mismatched:
        raise NotPublishable(
            "MDS sample counts differ from the manifest for: "
            + ", ".join(f"{r['partition']} ({r['mds_samples']} written, {r['manifest_ok']} ok)" for r in mismatched)
            + ". Re-materialize raw_manifest and then those partitions."
        )
    broken = []
    for key in keys:  # every shard of the new version: present, its size, its hash
        try:
            check_dataset(versions[key], "hash")
        except DatasetDamaged as exc:
            broken.append(f"class {key}: {exc}")
    if broken:
        raise NotPublishable(
            "Not publishing: shard files of the new version are missing or damaged:\n- "
            + "\n- ".join(broken[:SHOWN])
            + "\nRe-materialize mds_shards for those classes. The published dataset is unchanged."
        )
    return Publishable(versions, infos)
