"""Per-partition results for partitioned checks that run over a batch of classes.

Dagster 1.13 records an ``AssetCheckResult`` returned from a partition-range step without a
partition, so the UI would list every checked class as "Skipped". A check that covers a batch
instead yields one ``AssetCheckEvaluation`` per class, each naming its partition and the
materialization it checked; the UI then shows each class as passed or failed (docs/OPERATING.md: "Checks in
batched runs"). A blocking check that fails for one class fails the step, so the rest of that
batch's run stops too (its other classes are materialized and checked, but not built further).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from dagster import (
    AssetCheckEvaluation,
    AssetCheckExecutionContext,
    AssetCheckSeverity,
    AssetRecordsFilter,
    MetadataValue,
    Output,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)


def per_partition_results(
    context: AssetCheckExecutionContext,
    results: Mapping[str, tuple[bool, str, dict]],
    severity: AssetCheckSeverity = AssetCheckSeverity.ERROR,
) -> Iterator:
    """Yield one evaluation per partition (``results``: key -> (passed, description, metadata)),
    then the check op's output. Use as the body of a generator ``@asset_check``."""
    check = context.check_specs[0]
    latest = latest_materializations(context.instance, check.asset_key, list(results))
    for key, (passed, description, metadata) in results.items():
        record = latest.get(key)
        target = (
            AssetCheckEvaluationTargetMaterializationData(
                storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
            )
            if record is not None
            else None
        )
        yield AssetCheckEvaluation(
            asset_key=check.asset_key,
            check_name=check.name,
            passed=passed,
            partition=key,
            description=description,
            metadata={k: v if not isinstance(v, str) else MetadataValue.text(v) for k, v in metadata.items()},
            severity=severity,
            blocking=check.blocking,
            target_materialization_data=target,
        )
    yield Output(None)


def latest_materializations(instance, asset_key, partitions: list[str]) -> dict:
    """The latest materialization record of each of ``partitions`` (absent: never materialized), in
    two queries for the whole batch instead of one per partition."""
    from dagster import DagsterEventType

    if not partitions:
        return {}
    ids = instance.event_log_storage.get_latest_storage_id_by_partition(
        asset_key, DagsterEventType.ASSET_MATERIALIZATION, partitions=set(partitions)
    )
    if not ids:
        return {}
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=asset_key, storage_ids=list(ids.values())), limit=len(ids)
    ).records
    by_id = {record.storage_id: record for record in records}
    return {key: by_id[storage_id] for key, storage_id in ids.items() if storage_id in by_id}
