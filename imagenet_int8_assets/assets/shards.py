"""mds_shards (one MDS folder per class) and mds_dataset (the merged, readable dataset)."""

from dagster import (
    AssetCheckExecutionContext,
    AssetExecutionContext,
    BackfillPolicy,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from imagenet_int8_assets.assets.disk_space import SpaceNeeds
from imagenet_int8_assets.assets.manifest import (
    dataset_classes,
    raw_manifest,
    recorded_labels_or_fail,
    require_classes_in_source_or_fail,
    require_usable_images_or_fail,
)
from imagenet_int8_assets.assets.metadata import DATASET_GROUP, PartitionMetadata, markdown_table
from imagenet_int8_assets.assets.partition_checks import per_partition_results
from imagenet_int8_assets.core.dataset import publish_checks
from imagenet_int8_assets.core.dataset.publish_dataset import DatasetUnreadable, publish_dataset
from imagenet_int8_assets.core.dataset.shards_step import NonFiniteLatents, write_class_version
from imagenet_int8_assets.core.latents.quantize import recorded_range
from imagenet_int8_assets.core.common.files import bytes_per_image, folder_bytes
from imagenet_int8_assets.core.common.layout import mds_root
from imagenet_int8_assets.core.common.urls import redact_url
from imagenet_int8_assets.core.source.manifest import COUNT_COLUMNS, ok_counts_by_class, read_manifest
from imagenet_int8_assets.partitions import class_partitions
from imagenet_int8_assets.resources import (
    DEFAULT_MAX_PARTITIONS_PER_RUN,
    ImagenetInt8Settings,
)

# `core.dataset.mds` imports mosaicml-streaming, which imports torch, torchvision and transformers
# (about 10 s). Only the stage functions that write or open shards import it, inside their bodies,
# so loading the definitions and running the checks stay fast; index files go through mds_index.

READER_SNIPPET = """```python
from imagenet_int8_assets.reader import open_dataset   # registers the 'uint8' encoding
ds = open_dataset("{root}")                           # StreamingDataset (local folder)
sample = ds[0]  # {{'latent': float32 (4, 32, 32), 'label': int, 'label_as_text': str}}
```
The seed's reader (a `uint8` Encoding registered by hand, `StreamingDataset(local=..., remote="{root}")`) reads it unchanged."""


def remote_mds(settings: ImagenetInt8Settings):
    """The bucket the published dataset is mirrored to (IMAGENET_INT8_MDS_REMOTE), or None."""
    from imagenet_int8_assets.core.dataset.mds_remote import RemoteMds

    return RemoteMds(settings.mds_remote) if settings.mds_remote else None


def _remote_or_fail(call):
    from imagenet_int8_assets.core.dataset.mds_remote import RemoteError

    try:
        return call()
    except RemoteError as exc:
        raise Failure(str(exc)) from exc


def count_rows(settings: ImagenetInt8Settings, keys: list[str]) -> list[dict]:
    """Per class: the manifest's good images against the samples in the class's MDS index."""
    manifest = read_manifest(settings.output_path, COUNT_COLUMNS)
    return publish_checks.count_rows(mds_root(settings.output_path), ok_counts_by_class(manifest, keys), keys)


@asset(
    name="mds_shards",
    group_name=DATASET_GROUP,
    partitions_def=class_partitions,
    backfill_policy=BackfillPolicy.multi_run(DEFAULT_MAX_PARTITIONS_PER_RUN),
    deps=["vae_latents", raw_manifest],
    kinds={"mosaicml"},
    description=(
        "One class as MosaicML MDS shards in the published Imagenet.int8 schema "
        "(vae_output: custom 'uint8' encoding, 4096 bytes = 4x32x32 C-order; label; "
        "label_as_text), quantized round-to-nearest over +-range, written as a new immutable "
        "version in `mds/classes/<class>/<version>/`. The published dataset does not change "
        "until mds_dataset publishes it."
    ),
)
def mds_shards(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
    settings.require_recorded_settings_or_fail()
    require_classes_in_source_or_fail(settings, context.partition_keys)
    labels = recorded_labels_or_fail(settings, context.partition_keys)
    root = mds_root(settings.output_path)
    manifest = read_manifest(settings.output_path, COUNT_COLUMNS)
    space = SpaceNeeds("mds_shards", settings.output_path, sum(ok_counts_by_class(manifest, context.partition_keys).values()))

    def class_space(images: int, nbytes: int, key: str) -> SpaceNeeds:
        space.writing(images, nbytes, key)
        return space

    partition_metadata, samples, remote = PartitionMetadata(context), 0, remote_mds(settings)
    for key in context.partition_keys:
        try:
            written = write_class_version(
                settings.output_path, key, labels.index[key], labels.text[key], settings.quant_range, space=class_space
            )
        except NonFiniteLatents as exc:
            raise Failure(str(exc)) from None
        folder, index, count = written.folder, written.index, written.samples
        extra = {}
        if remote is not None:  # the version's files, never replacing an object; mds_dataset publishes
            mirrored = _remote_or_fail(lambda: remote.mirror_version(root, folder))
            extra = {
                "remote": redact_url(f"{remote.url}/{folder.relative_to(root).as_posix()}"),
                "uploaded_files": len(mirrored.uploaded),
            }
        partition_metadata.add(
            key,
            {
                "path": MetadataValue.path(str(folder)),
                "version": folder.name,
                "samples": count,
                "shards": len(index["shards"]),
                "label": labels.index[key],
                "label_as_text": labels.text[key],
                "bytes": int(sum(s["raw_data"]["bytes"] for s in index["shards"])),
                "bytes_per_image": bytes_per_image(folder_bytes(folder), count),  # shards + index.json + build.json
                **extra,
            },
        )
        samples += count
    context.log.info(f"{samples} samples of {len(context.partition_keys)} class(es) written as MDS shards under {root}")
    return MaterializeResult()


def _every_n_uploads(context: AssetExecutionContext, n: int):
    count = 0

    def progress(relative: str) -> None:
        nonlocal count
        count += 1
        if count % n == 0:
            context.log.info(f"{count} file(s) uploaded, latest {relative}")

    return progress


@asset_check(
    asset=mds_shards,
    partitions_def=class_partitions,
    blocking=True,
    additional_deps=[raw_manifest],
    description="Blocks the merged dataset when a class's MDS sample count differs from the manifest's 'ok' count.",
)
def mds_count_matches_manifest(context: AssetCheckExecutionContext, settings: ImagenetInt8Settings):
    results = {}
    for row in count_rows(settings, context.partition_keys):
        ok = row["manifest_ok"] == row["mds_samples"]
        description = (
            "the class has exactly its manifest's good images"
            if ok
            else f"{row['mds_samples']} samples written, {row['manifest_ok']} good images in the manifest: files "
            "changed or failed to crop since the manifest was built; re-materialize raw_manifest, then this partition"
        )
        results[row["partition"]] = (ok, description, {"manifest_ok": row["manifest_ok"], "mds_samples": row["mds_samples"]})
    yield from per_partition_results(context, results)


@asset(
    name="mds_dataset",
    group_name=DATASET_GROUP,
    deps=[mds_shards, "quantization_stats"],
    kinds={"mosaicml"},
    description=(
        "The published dataset: checks that every class's current version was built with the "
        "same settings and holds its manifest's good images, then atomically replaces "
        "mds/index.json (every class's shards in class order, so StreamingDataset and the "
        "published readers read mds/ as one dataset) and removes versions no index refers to. "
        "With IMAGENET_INT8_MDS_REMOTE, then mirrors it to the bucket: missing class versions "
        "first, every shard checked there, index.json last."
    ),
)
def mds_dataset(context: AssetExecutionContext, settings: ImagenetInt8Settings) -> MaterializeResult:
    from imagenet_int8_assets.core.dataset.mds_remote import RemoteError

    settings.require_recorded_settings_or_fail()
    classes = dataset_classes(context.instance, settings)
    keys = classes.in_dataset
    root = mds_root(settings.output_path)
    manifest = read_manifest(settings.output_path, COUNT_COLUMNS)
    require_usable_images_or_fail(manifest)
    if classes.vanished:
        context.log.warning(
            f"{len(classes.vanished)} class(es) vanished from the source: {', '.join(classes.vanished[:20])}. "
            "They are kept from the last build; to drop a class delete its partition. Their sample counts are not "
            "compared with the manifest (it has no rows for them)."
        )
    if classes.foreign:
        context.log.warning(
            f"{len(classes.foreign)} registered class(es) are neither in this source nor built here (another "
            f"output sharing DAGSTER_HOME?), left out: {', '.join(classes.foreign[:20])}"
        )
    remote = remote_mds(settings)

    def index_space(nbytes: int) -> SpaceNeeds:
        space = SpaceNeeds("mds_dataset", settings.output_path)
        space.writing(1, nbytes)
        return space

    try:
        done = publish_dataset(
            root, keys, ok_counts_by_class(manifest, classes.present), remote=remote, space=index_space,
            info=context.log.info, upload_progress=_every_n_uploads(context, 50),
        )
    except (publish_checks.NotPublishable, DatasetUnreadable, RemoteError) as exc:
        raise Failure(str(exc)) from exc
    summary, first, strays = done.summary, done.first, done.strays
    remote_metadata = {}
    if done.mirrored is not None:
        mirrored = done.mirrored
        remote_metadata = {
            "remote": redact_url(remote.url),
            "remote_uploaded_files": len(mirrored.uploaded),
            "remote_uploaded_bytes": mirrored.uploaded_bytes,
            "remote_published": "new index" if mirrored.published else "unchanged",
            "remote_removed_versions": len(mirrored.removed),
        }
    fallback = bool(first.get("vae", {}).get("fallback_reason"))
    metadata = {
        "path": MetadataValue.path(str(root)),
        "samples": summary["samples"],
        "shards": summary["shards"],
        "classes": len(keys),
        "bytes": done.bytes,
        "vae": first["vae"]["requested"],
        "vae_revision": first["vae"].get("revision") or "",
        "vae_weights_sha256": first["vae"].get("weights_sha256") or "",
        "vae_fallback": fallback,
        "latent_value": first["latent_value"],
        "quant_range": recorded_range(first),
        "dequantize": first["dequantize"],
        "latent_shape": str(tuple(first["latent_shape"])),
        "schema": MetadataValue.json(first["schema"]),
        "precision": first["precision"],
        "crop_recipe": first["crops"]["recipe"],
        "per_class": MetadataValue.md(
            markdown_table([{"class": k, "samples": v} for k, v in summary["per_class"].items()])
        ),
        "read_it": MetadataValue.md(
            READER_SNIPPET.format(root=root)
            + (f"\n\nFrom the bucket: `open_dataset(\"{redact_url(remote.url)}\", local=\"/tmp/cache\")`" if remote else "")
        ),
        "stray_entries": ", ".join(strays),
        "published": "new version" if done.published else "unchanged (same content as the published index)",
        "versions": MetadataValue.md(
            markdown_table([{"class": k, "version": v} for k, v in summary["versions"].items()])
        ),
        "removed_versions_and_leftovers": len(done.removed),
        "vanished_classes": ", ".join(classes.vanished),
        "vanished_count": len(classes.vanished),
        "foreign_classes": ", ".join(classes.foreign),
        **remote_metadata,
    }
    if fallback:
        metadata["WARNING"] = "Built with RANDOM VAE weights (demo fallback): the latents are not meaningful."
        context.log.warning(metadata["WARNING"])
    if strays:
        context.log.warning(f"Entries in {root} not in the dataset (left alone): {', '.join(strays)}")
    context.log.info(f"Dataset at {root}: {summary['samples']} samples, {summary['shards']} shards")
    return MaterializeResult(metadata=metadata)

