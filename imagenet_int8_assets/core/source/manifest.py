"""Reading what the last source scan (raw_manifest) wrote under the output: the manifest (one row
per file, with a status) and the class list (classes, labels, data versions), and the questions
every later step asks of them (which classes form the dataset, each class's good images, is there
anything to build). No Dagster: the refusals are ``ManifestRefusal``s, which the assets turn into
failures that are not retried."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pandas as pd

from imagenet_int8_assets.core.common.layout import MissingArtifact, manifest_path, source_classes_path
from imagenet_int8_assets.core.source.sources import ClassLabels

# what counting each class's good images needs: reading only these two columns of an ImageNet-size
# manifest takes 0.1 s instead of 0.8 s, and the steps after the last encode read it four times
COUNT_COLUMNS = ("class_folder", "status")


class ManifestRefusal(ValueError):
    """A step cannot go on with what the last scan found (no usable image, a class not in the
    source, a class without a recorded label): the message says what to do; retrying cannot help."""


def read_manifest(output: str | os.PathLike, columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """The manifest, or only its ``columns`` (``COUNT_COLUMNS`` to count good images)."""
    path = manifest_path(output)
    if not path.is_file():
        raise MissingArtifact(
            f"No manifest at {str(path)!r}. Materialize 'raw_manifest' first (or run `imagenet-int8 build`)."
        )
    return pd.read_parquet(path, columns=list(columns) if columns else None)


def previous_manifest(output: str | os.PathLike) -> pd.DataFrame | None:
    """The last manifest, to reuse its rows of unchanged files; None when absent or unreadable."""
    try:
        return read_manifest(output)
    except Exception:  # a damaged manifest is simply rebuilt
        return None


def read_source_classes(output: str | os.PathLike) -> dict:
    """The last scan's classes: ``{"classes": [...], "labels": {class: [index, text]}, "versions": {class: v}}``."""
    path = source_classes_path(output)
    if not path.is_file():
        raise MissingArtifact(
            f"No class list at {str(path)!r}. Materialize 'raw_manifest' first (or run `imagenet-int8 build`)."
        )
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class DatasetClasses:
    """Which registered classes form the dataset.

    ``present``: in the source at the last scan. ``vanished``: registered and built by this output
    but gone from the source; the dataset keeps their last build (never silently dropped).
    ``foreign``: registered in the instance but neither in this source nor built here (another
    output sharing the DAGSTER_HOME); left out.
    """

    present: list[str]
    vanished: list[str]
    foreign: list[str]

    @property
    def in_dataset(self) -> list[str]:
        return sorted(self.present + self.vanished)


def dataset_kept_classes(output: str | os.PathLike, names) -> list[str]:
    """Those of ``names`` that this output has built (a current MDS version): a dataset holds them."""
    from imagenet_int8_assets.core.common.layout import mds_root
    from imagenet_int8_assets.core.dataset import mds_index

    root = mds_root(output)
    return [k for k in names if (mds_index.class_home(root, k) / mds_index.CURRENT).is_file()]


def dataset_classes(output: str | os.PathLike, registered) -> DatasetClasses:
    """Split the ``registered`` classes (the instance's partitions) by ``DatasetClasses``' rules
    (reads the last scan)."""
    in_source = set(read_source_classes(output)["classes"])
    others = sorted(set(registered) - in_source)
    vanished = dataset_kept_classes(output, others)
    foreign = [k for k in others if k not in set(vanished)]
    return DatasetClasses(sorted(in_source), vanished, foreign)


def recorded_labels(output: str | os.PathLike, keys) -> ClassLabels:
    """The labels the last scan gave ``keys`` (vanished classes keep theirs)."""
    recorded = read_source_classes(output)["labels"]
    unknown = [k for k in keys if k not in recorded]
    if unknown:
        raise ManifestRefusal(
            f"No label for class(es) {', '.join(unknown[:20])}: they are not in the source scanned by raw_manifest. "
            "Materialize raw_manifest; a partition of another output sharing this DAGSTER_HOME cannot be built here."
        )
    return ClassLabels(
        scheme="recorded",
        index={k: int(recorded[k][0]) for k in keys},
        text={k: str(recorded[k][1]) for k in keys},
        note="labels recorded by the last raw_manifest scan",
    )


def require_classes_in_source(output: str | os.PathLike, keys) -> None:
    """A ``ManifestRefusal`` naming the classes whose folder the last scan did not find.

    Rebuilding such a class would replace its last build with an empty one (silently dropping it
    from the dataset), so it is refused."""
    in_source = set(read_source_classes(output)["classes"])
    missing = [k for k in keys if k not in in_source]
    if missing:
        raise ManifestRefusal(
            f"{len(missing)} class(es) are not in the source scanned by raw_manifest: {', '.join(missing[:20])}. "
            "If the folder was added since, materialize raw_manifest first. If it vanished, the dataset keeps its "
            "last build; to drop it, delete its partition (docs/OPERATING.md: Live class partitions). A partition "
            "of another output sharing this DAGSTER_HOME cannot be built here."
        )


def ok_rows_by_class(manifest: pd.DataFrame, class_folders) -> dict[str, pd.DataFrame]:
    """The good images (status ``ok``) of each of ``class_folders``, an empty frame for a class with
    none. Rows of top-level entries that are not classes (a bad folder name, a link not followed)
    have class_folder "" and status bad/skipped, so never match. One ``groupby``: a step over a
    batch of classes splits the manifest once instead of filtering every row once per class (at
    ImageNet size a mask over the 1.28 M rows costs about 0.13 s)."""
    ok = manifest[manifest["status"] == "ok"]
    groups = {key: rows for key, rows in ok.groupby("class_folder", sort=False)}
    return {key: groups[key] if key in groups else ok.iloc[:0] for key in class_folders}


def ok_counts_by_class(manifest: pd.DataFrame, class_folders) -> dict[str, int]:
    """How many good images (status ``ok``) each of ``class_folders`` has, 0 for none: one
    ``value_counts`` (``COUNT_COLUMNS`` are enough)."""
    counts = manifest.loc[manifest["status"] == "ok", "class_folder"].value_counts()
    return {key: int(counts.get(key, 0)) for key in class_folders}


def require_usable_images(manifest: pd.DataFrame) -> None:
    """A ``ManifestRefusal`` saying "no usable images", with the manifest's counts, when no file is ``ok``.

    Nothing to build (every file bad or skipped, or class folders without files): the steps that
    need at least one image (mds_dataset, probe_features) and `imagenet-int8 build` (right after
    the manifest) call this first, so the user reads the counts instead of a stack trace.
    """
    if (manifest["status"] == "ok").any():
        return
    counts = manifest["status"].value_counts()
    classes = manifest.loc[manifest["class_folder"] != "", "class_folder"].nunique()
    raise ManifestRefusal(
        f"No usable images: the manifest lists {len(manifest)} file(s) in {classes} class folder(s), "
        f"0 ok, {int(counts.get('bad', 0))} bad, {int(counts.get('skipped', 0))} skipped, so there is "
        "nothing to build. Add images to the source's class folders or fix the bad files (raw_manifest's "
        "metadata lists each with its reason), then materialize raw_manifest again."
    )

