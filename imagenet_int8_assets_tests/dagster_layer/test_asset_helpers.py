"""The Dagster-layer helpers that replace per-class instance queries in batched steps:
PartitionMetadata (metadata per partition without re-reading every dynamic partition per call)
and latest_materializations (one batch query instead of one per partition). Real instance, real runs."""

from __future__ import annotations

import dagster as dg

from imagenet_int8_assets.assets.metadata import PartitionMetadata
from imagenet_int8_assets.assets.partition_checks import latest_materializations

parts = dg.DynamicPartitionsDefinition(name="helper_classes")


@dg.asset(partitions_def=parts, backfill_policy=dg.BackfillPolicy.multi_run(10))
def batched(context) -> dg.MaterializeResult:
    metadata = PartitionMetadata(context)
    for key in context.partition_keys:
        metadata.add(key, {"which": key, "length": len(key)})
    extra = context.run.tags.get("extra_key")
    if extra:
        metadata.add(extra, {"which": extra})
    return dg.MaterializeResult()


def _materialize(instance, keys, **tags):
    return dg.materialize(
        [batched], instance=instance, raise_on_error=False,
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1], **tags},
    )


def test_partition_metadata_lands_on_each_partition_and_refuses_other_keys():
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("helper_classes", ["a", "bb", "ccc", "dddd"])
        assert _materialize(instance, ["a", "ccc"]).success
        latest = latest_materializations(instance, batched.key, ["a", "bb", "ccc", "dddd"])
        assert sorted(latest) == ["a", "bb", "ccc"]  # dddd was never materialized
        for key, record in latest.items():
            metadata = record.asset_materialization.metadata
            assert metadata["which"].value == key and metadata["length"].value == len(key)

        refused = _materialize(instance, ["a", "bb"], extra_key="dddd")
        assert not refused.success
        failure = next(e for e in refused.all_events if e.is_step_failure)
        assert "partition 'dddd' is not one of this step's 2 partition(s)" in str(failure.step_failure_data.error)


def test_latest_materializations_returns_the_newest_record_of_each_partition():
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("helper_classes", ["a", "bb"])
        first = _materialize(instance, ["a", "bb"])
        second = _materialize(instance, ["a", "a"])
        assert first.success and second.success
        latest = latest_materializations(instance, batched.key, ["a", "bb"])
        assert latest["a"].run_id == second.run_id and latest["bb"].run_id == first.run_id
        assert latest_materializations(instance, batched.key, []) == {}
        assert latest_materializations(instance, dg.AssetKey("never"), ["a"]) == {}


def test_partition_metadata_is_refused_outside_a_partitioned_step():
    @dg.asset
    def plain(context) -> None:
        PartitionMetadata(context)

    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([plain], instance=instance, raise_on_error=False)
        assert not result.success


def test_a_preloaded_vae_is_used_once_and_a_failed_preload_leaves_the_error_to_the_step(tmp_path):
    from imagenet_int8_assets.assets.latents import _load_vae, preload_vae
    from imagenet_int8_assets.resources import ImagenetInt8Settings

    settings = ImagenetInt8Settings(output=str(tmp_path / "out"), vae="tiny-random", device="cpu")
    preload_vae(settings)
    first, how = _load_vae(settings)
    assert "before the run started" in how
    again, how_again = _load_vae(settings)  # used once: the next step loads its own
    assert again is not first and "before the run started" not in how_again
    assert first.info.requested == again.info.requested == "tiny-random"

    missing = ImagenetInt8Settings(output=str(tmp_path / "out"), vae=str(tmp_path / "no-such-vae"), device="cpu")
    preload_vae(missing)  # does not raise: the step's own load reports the problem
    try:
        _load_vae(missing)
    except Exception as exc:
        assert "no-such-vae" in str(exc)
    else:
        raise AssertionError("a VAE folder that does not exist loaded")
