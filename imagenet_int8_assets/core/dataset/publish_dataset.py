"""The dataset stage: the classes' current MDS versions published as one dataset (what the
``mds_dataset`` asset and the benchmark's reference build call).

In order: ``publish_checks.check_publishable`` (every class built, with the same settings, holding
its manifest's good images, every shard intact; raises ``NotPublishable``), the merged index of
exactly the versions checked, ``mds/index.json`` swapped atomically, the dataset opened by
``StreamingDataset`` (raises ``DatasetUnreadable`` when it sees another sample count), versions no
index refers to and leftovers removed, and with a remote, the mirror to the bucket (raises
``RemoteError``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from imagenet_int8_assets.core.common.files import remove_leftovers
from imagenet_int8_assets.core.common.urls import redact_url
from imagenet_int8_assets.core.dataset import mds_index, publish_checks


def _ignore(*_args) -> None:
    return None


class DatasetUnreadable(Exception):
    """The published index does not read back as the dataset that was merged."""


@dataclass
class DatasetPublished:
    """What ``publish_dataset`` did: the merged ``index`` and its ``summary`` (samples, shards,
    per_class, versions), the first class's build record (``first``: the settings every class
    shares), whether the index changed (``published``), what was swept, entries of ``root`` that are
    not the dataset's (``strays``, left alone), and the bucket mirror's result (None without one)."""

    root: Path
    keys: list[str]
    index: dict
    summary: dict
    first: dict
    published: bool
    removed: list
    strays: list[str]
    mirrored: object = None

    @property
    def bytes(self) -> int:
        return int(sum(s["raw_data"]["bytes"] for s in self.index["shards"]))


def publish_dataset(
    root: str | os.PathLike,
    keys: Sequence[str],
    manifest_ok: Mapping[str, int],
    *,
    remote=None,
    space: Callable[[int], object] | None = None,
    info: Callable[[str], None] = _ignore,
    upload_progress: Callable[[str], None] | None = None,
) -> DatasetPublished:
    """Publish ``keys``' current versions under ``root`` as one dataset (see the module docstring).

    ``manifest_ok``: the good images of the classes whose sample counts are compared (those in the
    source). ``remote``: a ``RemoteMds`` to mirror to after the local sweep (the bucket keeps what
    the root keeps); ``upload_progress(relative)`` sees each uploaded file. ``space(nbytes)``
    returns the disk-space guard of the index swap (``guard()``, as ``SpaceNeeds`` after
    ``writing``).
    """
    from imagenet_int8_assets.core.dataset import mds

    root = Path(root)
    keys = list(keys)
    checked = publish_checks.check_publishable(root, keys, manifest_ok)
    index, summary = mds_index.merged_index(root, keys, checked.versions)  # exactly what was checked
    first = next(iter(checked.infos.values()))
    with space(2 * len(json.dumps(index))).guard() if space is not None else nullcontext():
        published = mds_index.swap_in_index(root, index, mds_index.dataset_record(first, summary))
    check = mds.verify_readable(root)
    if check["samples"] != summary["samples"]:
        raise DatasetUnreadable(f"StreamingDataset sees {check['samples']} samples, the index lists {summary['samples']}.")
    removed = remove_leftovers(root) + mds_index.collect_garbage(root)
    strays = mds_index.stray_entries(root, keys)
    mirrored = None
    if remote is not None:  # after the local sweep: the bucket keeps what the root keeps
        info(f"Mirroring the dataset to {redact_url(remote.url)} (class versions first, index.json last)")
        mirrored = remote.mirror_dataset(root, progress=upload_progress)
        info(
            f"{redact_url(remote.url)}: {len(mirrored.uploaded)} file(s) uploaded ({mirrored.uploaded_bytes} bytes), "
            f"{mirrored.present} already there, index {'published' if mirrored.published else 'unchanged'}, "
            f"{len(mirrored.removed)} unreferenced version(s) removed"
        )
    return DatasetPublished(root, keys, index, summary, first, published, removed, strays, mirrored)
