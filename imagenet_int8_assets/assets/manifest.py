"""raw_manifest: one row per file under the source, with a status and a reason."""

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetObservation,
    DataVersion,
    DataVersionsByPartition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    observable_source_asset,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from imagenet_int8_assets.assets.metadata import DATASET_GROUP, markdown_table, progress_logger
from imagenet_int8_assets.core.source.manifest import (
    DatasetClasses,
    ManifestRefusal,
    read_source_classes,
    recorded_labels,
    require_classes_in_source,
    require_usable_images,
)
from imagenet_int8_assets.core.source.manifest import dataset_classes as split_dataset_classes
from imagenet_int8_assets.core.source.scan_step import scan_manifest, write_manifest
from imagenet_int8_assets.core.source.sources import ClassLabels
from imagenet_int8_assets.partitions import (
    class_partitions,
    register_classes,
    registered_classes,
)
from imagenet_int8_assets.resources import ImagenetInt8Settings


def dataset_classes(instance, settings: ImagenetInt8Settings) -> DatasetClasses:
    """The instance's registered classes split by ``DatasetClasses``' rules (reads the last scan)."""
    return split_dataset_classes(settings.output_path, registered_classes(instance))


def _refusal_fails(call, *args):
    """``call(*args)``, a ``ManifestRefusal`` turned into a failure that is not retried."""
    try:
        return call(*args)
    except ManifestRefusal as exc:
        raise Failure(description=str(exc), allow_retries=False) from None


def recorded_labels_or_fail(settings: ImagenetInt8Settings, keys) -> ClassLabels:
    """``core.source.manifest.recorded_labels``; a class without a label fails the step."""
    return _refusal_fails(recorded_labels, settings.output_path, keys)


def require_classes_in_source_or_fail(settings: ImagenetInt8Settings, keys) -> None:
    """``core.source.manifest.require_classes_in_source``; a class not in the source fails the step."""
    _refusal_fails(require_classes_in_source, settings.output_path, keys)


def require_usable_images_or_fail(manifest: pd.DataFrame) -> None:
    """``core.source.manifest.require_usable_images``; no usable image fails the step."""
    _refusal_fails(require_usable_images, manifest)


@observable_source_asset(
    name="source_class_files",
    group_name=DATASET_GROUP,
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
    versions = read_source_classes(context.resources.settings.output_path)["versions"]
    return DataVersionsByPartition({key: DataVersion(v) for key, v in versions.items()})


def _observed_versions(instance) -> dict[str, str]:
    """The data version last observed for each class's files."""
    from dagster import DagsterEventType

    tags = instance.event_log_storage.get_latest_tags_by_partition(
        source_class_files.key, DagsterEventType.ASSET_OBSERVATION, [DATA_VERSION_TAG]
    )
    return {key: values[DATA_VERSION_TAG] for key, values in tags.items() if DATA_VERSION_TAG in values}


@asset(
    name="raw_manifest",
    group_name=DATASET_GROUP,
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
    registered = registered_classes(context.instance)
    context.log.info(f"Scanning {source} with {settings.worker_count()} worker process(es)")
    scan = scan_manifest(
        source,
        settings.output_path,
        max_pixels=settings.max_pixels,
        workers=settings.worker_count(),
        registered=registered,
        progress=progress_logger(context.log.info, "files probed"),
    )
    frame, labels, root_classes, versions, vanished = scan.frame, scan.labels, scan.classes, scan.versions, scan.vanished
    rewritten = int(frame.attrs.get("rewritten_files", 0))
    if rewritten:
        examples = ", ".join(frame.attrs.get("rewritten_examples", []))
        context.log.warning(
            f"{rewritten} file(s) kept their size and modification time but have a new ctime or inode, e.g. "
            f"{examples}: rewritten in place (or their permissions, owner or links changed). Decoded again; their "
            "classes get a new data version and are rebuilt."
        )
    new_classes = register_classes(context.instance, root_classes)
    path = write_manifest(settings.output_path, scan)
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
