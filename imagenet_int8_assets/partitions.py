"""Class partitions: one dynamic partition per class folder, registered in the Dagster instance.

The set of classes lives in the instance, not in the code: loading the definitions neither scans
the source nor writes anything. Partitions are added by ``raw_manifest`` (which scans the source),
by the ``class_folders`` sensor (within one sensor interval of a new class folder appearing) and
by ``imagenet-int8 build`` (which needs no daemon). A class whose folder vanished keeps its
partition: the dataset keeps its last build (docs/OPERATING.md: "Live class partitions").
"""

from __future__ import annotations

from collections.abc import Iterable

from dagster import DagsterInstance, DynamicPartitionsDefinition

CLASS_PARTITIONS = "classes"
class_partitions = DynamicPartitionsDefinition(name=CLASS_PARTITIONS)


def registered_classes(instance: DagsterInstance) -> list[str]:
    """Every registered class, sorted (= label order for ImageNet wnids, and the dataset's order)."""
    return sorted(instance.get_dynamic_partitions(CLASS_PARTITIONS))


def partition_order(instance: DagsterInstance) -> list[str]:
    """Every registered class in the instance's partition order: the order of registration, NOT
    sorted (a class added later comes last, whatever its name). A run's partition range
    (``dagster/asset_partition_range_start`` .. ``_end``) covers the classes between its two ends
    in this order, so ranges must be built from it (``class_runs.class_batches``)."""
    return list(instance.get_dynamic_partitions(CLASS_PARTITIONS))


def register_classes(instance: DagsterInstance, names: Iterable[str]) -> list[str]:
    """Add the classes not registered yet; returns them (sorted). Existing ones are left alone."""
    known = set(instance.get_dynamic_partitions(CLASS_PARTITIONS))
    new = sorted(set(names) - known)
    if new:
        instance.add_dynamic_partitions(CLASS_PARTITIONS, new)
    return new
