"""The raw_manifest stage, as the asset and the benchmark's reference call it: scan the source
(``scan_manifest``), then write the manifest and the class list (``write_manifest``). The asset
registers new class folders as partitions between the two."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from imagenet_int8_assets.core.common.files import atomic_write_bytes, atomic_write_json
from imagenet_int8_assets.core.common.layout import manifest_path, source_classes_path
from imagenet_int8_assets.core.source.manifest import dataset_kept_classes, previous_manifest
from imagenet_int8_assets.core.source.sources import ClassLabels, class_data_versions, find_class_folders, scan_source


@dataclass(frozen=True)
class Scan:
    """One scan: every file's row (``frame``), the labels, the class folders under the source
    (``classes``), each class's data version, and the built classes that ``vanished`` from it."""

    frame: pd.DataFrame
    labels: ClassLabels
    classes: list[str]
    versions: dict[str, str]
    vanished: list[str]


def scan_manifest(
    source: str | os.PathLike,
    output: str | os.PathLike,
    max_pixels: int,
    workers: int,
    registered: Iterable[str] = (),
    progress: Callable[[int, int], None] | None = None,
) -> Scan:
    """Scan ``source``, decoding only files that are new or changed since the last manifest under
    ``output``. Classes in ``registered`` that this output built and that are no longer in the source
    are kept as ``vanished`` (with their last labels)."""
    classes = list(find_class_folders(source).names)
    vanished = [k for k in dataset_kept_classes(output, list(registered)) if k not in set(classes)]
    frame, labels = scan_source(
        source,
        max_pixels=max_pixels,
        workers=workers,
        progress=progress,
        previous=previous_manifest(output),
        extra_classes=vanished,
    )
    return Scan(frame, labels, classes, class_data_versions(frame, labels), vanished)


def write_manifest(output: str | os.PathLike, scan: Scan) -> Path:
    """Write the scan's manifest (parquet) and class list (classes, labels, data versions, vanished
    classes), each atomically; returns the manifest's path."""
    buffer = io.BytesIO()
    scan.frame.to_parquet(buffer, index=False)
    path = manifest_path(output)
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_json(
        source_classes_path(output),
        {
            "classes": list(scan.classes),
            "labels": {k: [scan.labels.index[k], scan.labels.text[k]] for k in scan.labels.index},
            "versions": {k: scan.versions[k] for k in scan.classes},
            "vanished": scan.vanished,
        },
    )
    return path
