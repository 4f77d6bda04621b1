"""What an incremental `imagenet-int8 build` materializes: the missing or stale class partitions,
then the dataset assets if anything changed or they are missing or stale themselves.

Staleness is Dagster's own (code versions from the settings, data versions of each class's
files; see resources.BYTES_SETTINGS and assets/manifest.source_class_files), read through the
same resolver the UI uses; a partition whose files are gone from the output, or whose stored crops
failed verification when read (crop_store.verification_failure), is rebuilt too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dagster import AssetKey, DagsterInstance, Definitions

from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.common.layout import crops_dir, latents_dir, mds_root, report_dir, stats_path
from imagenet_int8_assets.resources import ImagenetInt8Settings
from imagenet_int8_assets.build.stages import CLASS_STEPS, DATASET_STEPS


@dataclass
class BuildPlan:
    classes: list[str]  # class partitions to (re)build, sorted
    dataset: bool  # whether the dataset assets run
    total_classes: int
    reasons: Counter = field(default_factory=Counter)  # why classes are rebuilt: reason -> count

    def describe(self, per_run: int, runs: int) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items())) or "none"
        dataset = "then the dataset assets" if self.dataset else "the dataset assets are up to date"
        return (
            f"{len(self.classes)} of {self.total_classes} class(es) to build ({why}) in {runs} batched run(s) of up to "
            f"{per_run}; {dataset}."
        )


def _on_disk(settings: ImagenetInt8Settings, asset: str, key: str) -> bool:
    out = settings.output_path
    if asset == "preprocessed_crops":
        return (crops_dir(out, key) / "meta.json").is_file()
    if asset == "vae_latents":
        return (latents_dir(out, key) / "meta.json").is_file()
    try:
        mds_index.current_version_dir(mds_root(out), key)
        return True
    except FileNotFoundError:
        return False


def plan_build(
    instance: DagsterInstance, defs: Definitions, settings: ImagenetInt8Settings, classes: list[str], force: bool
) -> BuildPlan:
    """The classes to build (all with ``force``) and whether the dataset assets must run."""
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    from imagenet_int8_assets.core.crops.crop_store import verification_failure

    classes = sorted(classes)
    if force:
        return BuildPlan(classes, True, len(classes), Counter({"forced": len(classes)}))
    graph = defs.resolve_asset_graph()
    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    todo, reasons = [], Counter()
    for key in classes:
        why = None
        for asset in CLASS_STEPS:
            status = resolver.get_status(AssetKey(asset), key)
            if status == StaleStatus.MISSING:
                why = "missing"
            elif status == StaleStatus.STALE:
                causes = resolver.get_stale_root_causes(AssetKey(asset), key)
                why = "stale: " + (causes[0].reason if causes else "stale")
            elif not _on_disk(settings, asset, key):
                why = "files missing from the output"
            if why:
                break
        if not why and verification_failure(crops_dir(settings.output_path, key)) is not None:
            why = "crops failed verification when read"  # a change the scan cannot see (crop_store)
        if why:
            todo.append(key)
            reasons[why] += 1
    return BuildPlan(todo, bool(todo) or _dataset_needs_build(instance, resolver, settings), len(classes), reasons)


def _dataset_needs_build(instance: DagsterInstance, resolver, settings: ImagenetInt8Settings) -> bool:
    """A dataset asset is missing, stale (code version), older than the newest class build, or its
    files are gone from the output; or a bucket is set (IMAGENET_INT8_MDS_REMOTE) whose index.json
    is not the local one (a bucket set on a built output, or one that cannot be read: mds_dataset
    then publishes, or says what is wrong)."""
    from dagster._core.definitions.data_version import StaleStatus

    root = mds_root(settings.output_path)
    if mds_index.published_record(root) is None or not stats_path(settings.output_path).is_file():
        return True
    if not (report_dir(settings.output_path) / "summary.json").is_file():
        return True
    records = {r.asset_entry.asset_key: r for r in instance.get_asset_records([AssetKey(k) for k in (*CLASS_STEPS, *DATASET_STEPS)])}

    def last(key: str) -> float:
        record = records.get(AssetKey(key))
        entry = record.asset_entry.last_materialization_record if record else None
        return entry.storage_id if entry else -1

    newest_class = max(last(k) for k in CLASS_STEPS)
    for key in DATASET_STEPS:
        if last(key) < newest_class or resolver.get_status(AssetKey(key)) in (StaleStatus.MISSING, StaleStatus.STALE):
            return True
    if settings.mds_remote:
        from imagenet_int8_assets.core.dataset.mds_remote import RemoteError, RemoteMds

        try:
            return not RemoteMds(settings.mds_remote).holds_index(root)  # one GET
        except RemoteError:
            return True
    return False
