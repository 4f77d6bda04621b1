"""raw_manifest: one row per file under the source, with a status and a reason."""


import io
import json
from dataclasses import dataclass

import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from imagenet_int8_assets.assets.metadata import GROUP, markdown_table, progress_logger
from imagenet_int8_assets.core.sources import scan_source
from imagenet_int8_assets.partitions import registered_classes
from imagenet_int8_assets.core.storage import MissingArtifact, atomic_write_bytes, manifest_path
from imagenet_int8_assets.resources import ImagenetInt8Settings


def read_manifest(settings: ImagenetInt8Settings) -> pd.DataFrame:
    path = manifest_path(settings.output_path)
    if not path.is_file():
        raise MissingArtifact(
            f"No manifest at {str(path)!r}. Materialize 'raw_manifest' first (or run `imagenet-int8 build`)."
        )
    return pd.read_parquet(path)


SOURCE_CLASSES = "classes.json"  # beside the manifest: the class folders and labels of the last scan


def source_classes_path(settings: ImagenetInt8Settings):
    return manifest_path(settings.output_path).with_name(SOURCE_CLASSES)


def read_source_classes(settings: ImagenetInt8Settings) -> dict:
    """The last scan's classes: ``{"classes": [...], "labels": {class: [index, text]}, "versions": {class: v}}``."""
    path = source_classes_path(settings)
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


def dataset_classes(instance, settings: ImagenetInt8Settings) -> DatasetClasses:
    """Split the instance's registered classes by ``DatasetClasses``' rules (reads the last scan)."""
    from imagenet_int8_assets.core import mds_index
    from imagenet_int8_assets.core.storage import mds_root

    in_source = set(read_source_classes(settings)["classes"])
    present, vanished, foreign = [], [], []
    root = mds_root(settings.output_path)
    for key in sorted(set(registered_classes(instance)) | in_source):
        if key in in_source:
            present.append(key)
        elif (mds_index.class_home(root, key) / mds_index.CURRENT).is_file():
            vanished.append(key)
        else:
            foreign.append(key)
    return DatasetClasses(present, vanished, foreign)


def ok_rows(manifest: pd.DataFrame, class_folder: str) -> pd.DataFrame:
    """The class's good images. Rows of top-level entries that are not classes (a bad folder
    name, a link not followed) have class_folder "" and status bad/skipped, so never match."""
    return manifest[(manifest["class_folder"] == class_folder) & (manifest["status"] == "ok")]


def require_usable_images(manifest: pd.DataFrame) -> None:
    """Stop with "no usable images" and the manifest's counts when no file is ``ok``.

    Nothing to build (every file bad or skipped, or class folders without files): the steps that
    need at least one image (mds_dataset, probe_features) and `imagenet-int8 build` (right after
    the manifest) call this first, so the user reads the counts instead of a stack trace.
    """
    from dagster import Failure

    if (manifest["status"] == "ok").any():
        return
    counts = manifest["status"].value_counts()
    classes = manifest.loc[manifest["class_folder"] != "", "class_folder"].nunique()
    raise Failure(
        description=(
            f"No usable images: the manifest lists {len(manifest)} file(s) in {classes} class folder(s), "
            f"0 ok, {int(counts.get('bad', 0))} bad, {int(counts.get('skipped', 0))} skipped, so there is "
            "nothing to build. Add images to the source's class folders or fix the bad files (raw_manifest's "
            "metadata lists each with its reason), then materialize raw_manifest again."
        ),
        allow_retries=False,
    )


@asset(
    name="raw_manifest",
    group_name=GROUP,
    kinds={"parquet"},
    description=(
        "Every file under the source: relative path (id), class folder, label index and text, "
        "width, height, mode, format, bytes, status (ok / bad / skipped) and the reason. Bad and "
        "skipped files are recorded here and left out of every later step."
    ),
)
def raw_manifest(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
    settings.preflight_or_fail()  # every setting checked before any work (README: Settings are checked ...)
    source = settings.source_path()
    context.log.info(f"Scanning {source} with {settings.worker_count()} worker process(es)")
    frame, labels = scan_source(
        source,
        max_pixels=settings.max_pixels,
        workers=settings.worker_count(),
        progress=progress_logger(context.log.info, "files probed"),
    )
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    path = manifest_path(settings.output_path)
    atomic_write_bytes(path, buffer.getvalue())

    status_counts = frame["status"].value_counts().to_dict()
    in_class = frame[frame["class_folder"].isin(labels.index.keys())]
    per_class = (
        in_class.pivot_table(index="class_folder", columns="status", values="id", aggfunc="count", fill_value=0)
        .reindex(columns=["ok", "bad", "skipped"], fill_value=0)
        .reset_index()
    )
    per_class.insert(1, "label", per_class["class_folder"].map(labels.index))
    per_class.insert(2, "label_text", per_class["class_folder"].map(labels.text))
    problems = frame[frame["status"] != "ok"][["id", "status", "reason"]]
    for row in problems.itertuples():
        context.log.warning(f"{row.status}: {row.id}: {row.reason}")
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "source": MetadataValue.path(str(source)),
            "files": len(frame),
            "ok": int(status_counts.get("ok", 0)),
            "bad": int(status_counts.get("bad", 0)),
            "skipped": int(status_counts.get("skipped", 0)),
            "classes": len(labels.index),
            "not_classes": int((frame["class_folder"] == "").sum()),
            "label_scheme": labels.scheme,
            "label_note": labels.note,
            "per_class": MetadataValue.md(markdown_table(per_class.to_dict("records"))),
            "bad_and_skipped_files": MetadataValue.md(markdown_table(problems.head(200).to_dict("records"))),
        }
    )
