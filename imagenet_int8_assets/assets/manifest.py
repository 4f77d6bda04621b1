"""raw_manifest: one row per file under the source, with a status and a reason."""


import io
import json
from dataclasses import dataclass

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetObservation,
    DataVersion,
    DataVersionsByPartition,
    MaterializeResult,
    MetadataValue,
    asset,
    observable_source_asset,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from imagenet_int8_assets.assets.metadata import GROUP, markdown_table, progress_logger
from imagenet_int8_assets.core.source.sources import ClassLabels, class_data_versions, find_class_folders, scan_source
from imagenet_int8_assets.core.common.layout import MissingArtifact, manifest_path
from imagenet_int8_assets.core.common.files import atomic_write_bytes, atomic_write_json
from imagenet_int8_assets.core.common.layout import source_classes_path as classes_json_path
from imagenet_int8_assets.partitions import (
    class_partitions,
    register_classes,
    registered_classes,
)
from imagenet_int8_assets.resources import ImagenetInt8Settings


# what counting each class's good images needs: reading only these two columns of an ImageNet-size
# manifest takes 0.1 s instead of 0.8 s, and the steps after the last encode read it four times
COUNT_COLUMNS = ("class_folder", "status")


def read_manifest(settings: ImagenetInt8Settings, columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """The manifest, or only its ``columns`` (``COUNT_COLUMNS`` to count good images)."""
    path = manifest_path(settings.output_path)
    if not path.is_file():
        raise MissingArtifact(
            f"No manifest at {str(path)!r}. Materialize 'raw_manifest' first (or run `imagenet-int8 build`)."
        )
    return pd.read_parquet(path, columns=list(columns) if columns else None)


def source_classes_path(settings: ImagenetInt8Settings):
    return classes_json_path(settings.output_path)


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


def dataset_kept_classes(settings: ImagenetInt8Settings, names) -> list[str]:
    """Those of ``names`` that this output has built (a current MDS version): a dataset holds them."""
    from imagenet_int8_assets.core.dataset import mds_index
    from imagenet_int8_assets.core.common.layout import mds_root

    root = mds_root(settings.output_path)
    return [k for k in names if (mds_index.class_home(root, k) / mds_index.CURRENT).is_file()]


def dataset_classes(instance, settings: ImagenetInt8Settings) -> DatasetClasses:
    """Split the instance's registered classes by ``DatasetClasses``' rules (reads the last scan)."""
    in_source = set(read_source_classes(settings)["classes"])
    others = sorted(set(registered_classes(instance)) - in_source)
    vanished = dataset_kept_classes(settings, others)
    foreign = [k for k in others if k not in set(vanished)]
    return DatasetClasses(sorted(in_source), vanished, foreign)


def recorded_labels(settings: ImagenetInt8Settings, keys) -> ClassLabels:
    """The labels the last scan gave ``keys`` (vanished classes keep theirs)."""
    from dagster import Failure

    recorded = read_source_classes(settings)["labels"]
    unknown = [k for k in keys if k not in recorded]
    if unknown:
        raise Failure(
            description=(
                f"No label for class(es) {', '.join(unknown[:20])}: they are not in the source scanned by raw_manifest. "
                "Materialize raw_manifest; a partition of another output sharing this DAGSTER_HOME cannot be built here."
            ),
            allow_retries=False,
        )
    return ClassLabels(
        scheme="recorded",
        index={k: int(recorded[k][0]) for k in keys},
        text={k: str(recorded[k][1]) for k in keys},
        note="labels recorded by the last raw_manifest scan",
    )


def require_classes_in_source(settings: ImagenetInt8Settings, keys) -> None:
    """A ``Failure`` naming the partitions whose class folder the last scan did not find.

    Rebuilding such a class would replace its last build with an empty one (silently dropping it
    from the dataset), so it is refused."""
    from dagster import Failure

    in_source = set(read_source_classes(settings)["classes"])
    missing = [k for k in keys if k not in in_source]
    if missing:
        raise Failure(
            description=(
                f"{len(missing)} class(es) are not in the source scanned by raw_manifest: {', '.join(missing[:20])}. "
                "If the folder was added since, materialize raw_manifest first. If it vanished, the dataset keeps its "
                "last build; to drop it, delete its partition (docs/OPERATING.md: Live class partitions). A partition "
                "of another output sharing this DAGSTER_HOME cannot be built here."
            ),
            allow_retries=False,
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


@observable_source_asset(
    name="source_class_files",
    group_name=GROUP,
    partitions_def=class_partitions,
    required_resource_keys={"settings"},
    description=(
        "The image files of one class folder in the source (not written by this graph). Each scan "
        "(raw_manifest) records an observation for every class whose files changed, with a data "
        "version from the manifest: each file's name, size, modification time and status, a stamp "
        "for a file rewritten in place (same size and modification time, new ctime or inode), and the "
        "class's label. A new data version marks that class's preprocessed_crops stale, and only it. "
        "Observing it re-records the versions of the last scan. It is observed, never materialized: the "
        "partition bar's \"0 % filled\" means exactly that (each class's data version is on the Observations tab)."
    ),
)
def source_class_files(context) -> DataVersionsByPartition:
    versions = read_source_classes(context.resources.settings)["versions"]
    return DataVersionsByPartition({key: DataVersion(v) for key, v in versions.items()})


def _observed_versions(instance) -> dict[str, str]:
    """The data version last observed for each class's files."""
    from dagster import DagsterEventType

    tags = instance.event_log_storage.get_latest_tags_by_partition(
        source_class_files.key, DagsterEventType.ASSET_OBSERVATION, [DATA_VERSION_TAG]
    )
    return {key: values[DATA_VERSION_TAG] for key, values in tags.items() if DATA_VERSION_TAG in values}


def _previous_manifest(settings: ImagenetInt8Settings) -> pd.DataFrame | None:
    """The last manifest, to reuse its rows of unchanged files; None when absent or unreadable."""
    try:
        return read_manifest(settings)
    except Exception:  # a damaged manifest is simply rebuilt
        return None


@asset(
    name="raw_manifest",
    group_name=GROUP,
    kinds={"parquet"},
    description=(
        "Every file under the source: relative path (id), class folder, label index and text, "
        "width, height, mode, format, bytes, modification time, status (ok / bad / skipped), the "
        "reason, ctime, inode and a change stamp for a file rewritten in place. Bad and skipped files are "
        "recorded here and left out of every later step. Also prepares the source (the bundled sample, a "
        "CIFAR-10 export), registers new class folders as partitions and records changed classes' data "
        "versions (source_class_files). A rescan decodes only new or changed files (a new size, "
        "modification time, ctime or inode)."
    ),
)
def raw_manifest(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
    settings.preflight_or_fail()  # every setting checked before any work (docs/GUARANTEES.md: Settings are checked ...)
    settings.require_recorded_settings_or_fail()
    settings.record_settings()
    source = settings.prepare_source()
    root_classes = find_class_folders(source).names
    registered = registered_classes(context.instance)
    vanished = [k for k in dataset_kept_classes(settings, registered) if k not in set(root_classes)]
    context.log.info(f"Scanning {source} with {settings.worker_count()} worker process(es)")
    frame, labels = scan_source(
        source,
        max_pixels=settings.max_pixels,
        workers=settings.worker_count(),
        progress=progress_logger(context.log.info, "files probed"),
        previous=_previous_manifest(settings),
        extra_classes=vanished,
    )
    rewritten = int(frame.attrs.get("rewritten_files", 0))
    if rewritten:
        examples = ", ".join(frame.attrs.get("rewritten_examples", []))
        context.log.warning(
            f"{rewritten} file(s) kept their size and modification time but have a new ctime or inode, e.g. "
            f"{examples}: rewritten in place (or their permissions, owner or links changed). Decoded again; their "
            "classes get a new data version and are rebuilt."
        )
    new_classes = register_classes(context.instance, root_classes)
    versions = class_data_versions(frame, labels)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    path = manifest_path(settings.output_path)
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_json(
        source_classes_path(settings),
        {
            "classes": list(root_classes),
            "labels": {k: [labels.index[k], labels.text[k]] for k in labels.index},
            "versions": {k: versions[k] for k in root_classes},
            "vanished": vanished,
        },
    )
    observed = _observed_versions(context.instance)
    changed = [k for k in root_classes if observed.get(k) != versions[k]]
    # counted once for all classes: a mask over every row per class costs about 0.12 s at ImageNet
    # size, 2 minutes for a first build's 1,000 classes
    files = frame["class_folder"].value_counts()
    ok = frame.loc[frame["status"] == "ok", "class_folder"].value_counts()
    for key in changed:
        context.log_event(
            AssetObservation(
                asset_key=source_class_files.key,
                partition=key,
                tags={DATA_VERSION_TAG: versions[key]},
                metadata={"files": int(files.get(key, 0)), "ok": int(ok.get(key, 0)), "label": labels.index[key]},
            )
        )

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
    if vanished:
        context.log.warning(
            f"{len(vanished)} class folder(s) vanished from the source: {', '.join(vanished[:20])}. The dataset keeps "
            "their last build (docs/OPERATING.md: Live class partitions)."
        )
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "source": MetadataValue.path(str(source)),
            "files": len(frame),
            "decoded_files": len(frame) - int(frame.attrs.get("reused_rows", 0)),
            "reused_rows": int(frame.attrs.get("reused_rows", 0)),
            "rewritten_files": int(frame.attrs.get("rewritten_files", 0)),
            "ok": int(status_counts.get("ok", 0)),
            "bad": int(status_counts.get("bad", 0)),
            "skipped": int(status_counts.get("skipped", 0)),
            "classes": len(root_classes),
            "new_classes": ", ".join(new_classes),
            "changed_classes": len(changed),
            "vanished_classes": ", ".join(vanished),
            "not_classes": int((frame["class_folder"] == "").sum()),
            "label_scheme": labels.scheme,
            "label_note": labels.note,
            "per_class": MetadataValue.md(markdown_table(per_class.to_dict("records"))),
            "bad_and_skipped_files": MetadataValue.md(markdown_table(problems.head(200).to_dict("records"))),
        }
    )
