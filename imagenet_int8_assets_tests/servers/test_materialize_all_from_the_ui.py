"""End to end through the real UI stack: `dagster dev` (webserver + daemon) in a subprocess, on
the output of an `imagenet-int8 build` that was killed.

First a real build is killed with SIGKILL while its batched run holds the `gpu` pool (granularity
run, limit 1), which leaves that run STARTED for good. Then `dagster dev` on the same DAGSTER_HOME
and output proves that (1) the webserver serves the whole asset graph with its class partitions
and (2) the user's first click, "Materialize all" (a backfill of every materializable asset over
every partition, launched the way the UI launches it: the GraphQL mutation
``launchPartitionBackfill`` posted to ``/graphql``), is carried out by the daemon, ends with the
BACKFILL's status "completed successfully" (not only its runs), leaves nothing for "Materialize
unsynced", and produces a dataset that StreamingDataset reads. Nobody runs the CLI again: our
sensor fails the dead run, so that the backfill's gpu runs are not held in QUEUED ("blocked by
global concurrency limits").

Runs on the bundled sample (4 classes) with the tiny random VAE on CPU; no network, no mocks.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from imagenet_int8_assets.build.dead_runs import PID_TAG
from imagenet_int8_assets_tests.support.dagster_dev import (
    ASSET_NODES_QUERY,
    ASSET_STATUS_QUERY,
    LOCATION,
    RUNS_QUERY,
    dagster_dev_env,
    dev_folders,
    launch_backfill,
    running_dagster_dev,
    unsynced,
    use_home,
    wait_for_backfill,
    wait_for_classes,
)
from imagenet_int8_assets_tests.support.killed_build import kill_build_during_gpu_run

CLASSES = ["n01440764", "n02102040", "n02979186", "n03000684"]
ASSETS = [
    "raw_manifest", "preprocessed_crops", "vae_latents", "quantization_stats", "mds_shards", "mds_dataset",
    "reconstruction_report", "probe_features", "latent_probe",
]
PARTITIONED = {"preprocessed_crops", "vae_latents", "mds_shards"}
PARTITIONS_PER_RUN = 2
LATENT_BYTES = 4 * 32 * 32

# The backfill must finish this long after the test starts, leaving the rest of the 600 s
# pytest-timeout for the checks and the teardown (so a slow run fails with diagnostics).
BACKFILL_DEADLINE_S = 480

# ------------------------------------------------------------------------------------------
# fixture


@pytest.fixture
def killed_then_dagster_dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A build killed while its run holds the gpu pool, then `dagster dev` on its DAGSTER_HOME."""
    out, home, tmp = dev_folders(tmp_path)

    # IMAGENET_INT8_SOURCE unset: the bundled sample
    env = dagster_dev_env(out, home, tmp, IMAGENET_INT8_MAX_PARTITIONS_PER_RUN=str(PARTITIONS_PER_RUN))
    command = [str(Path(sys.executable).parent / "imagenet-int8"), "build"]
    # the CLI prepares DAGSTER_HOME as it would for the UI: shipped dagster.yaml, gpu pool = 1
    killed = kill_build_during_gpu_run(command, env, tmp_path, home, tmp_path / "build.log")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.STARTED

    # This process reads the same instance and writes streaming's temporary files under tmp too.
    use_home(monkeypatch, home, tmp)
    with running_dagster_dev(env, tmp_path / "dagster_dev.log", out, home) as dev:
        yield killed, dev


# ------------------------------------------------------------------------------------------
# the test


@pytest.mark.timeout(720)
def test_after_a_killed_build_the_ui_serves_the_graph_and_materialize_all_builds_the_dataset(killed_then_dagster_dev):
    killed, dev = killed_then_dagster_dev
    started = time.monotonic()

    # ---- (1) the UI serves the whole graph with its class partitions ---------------------
    entry = next(e for e in dev.served["workspace"]["locationEntries"] if e["name"] == LOCATION)
    location = entry["locationOrLoadError"]
    assert location["__typename"] == "RepositoryLocation", f"location failed to load: {location}"
    assert location["repositories"], "the location has no repository"
    print(f"\n[ui] location loaded after {time.monotonic() - started:.1f}s")

    wait_for_classes(dev, CLASSES)  # the class_folders sensor registers them on its first tick
    nodes = {tuple(n["assetKey"]["path"]): n for n in dev.graphql(ASSET_NODES_QUERY)["assetNodes"]}
    assert {k[0] for k in nodes if len(k) == 1} >= set(ASSETS), f"asset nodes served: {sorted(nodes)}"
    for name in ASSETS:
        node = nodes[(name,)]
        assert node["repository"]["location"]["name"] == LOCATION
        if name in PARTITIONED:
            assert node["isPartitioned"], f"{name} should be partitioned"
            assert node["partitionKeys"] == CLASSES, f"{name} partitions: {node['partitionKeys']}"
            assert node["backfillPolicy"]["maxPartitionsPerRun"] == PARTITIONS_PER_RUN, node["backfillPolicy"]
        else:
            assert not node["isPartitioned"], f"{name} should not be partitioned"
            assert node["partitionKeys"] == [], f"{name} partitions: {node['partitionKeys']}"

    # "Materialize all" selects every materializable asset: with no Hub repository configured,
    # hub_upload is not in the graph (it would record nothing and fail the backfill)
    everything = sorted(k[0] for k, n in nodes.items() if n["isMaterializable"])
    assert everything == sorted(ASSETS), everything

    # ---- (2) "Materialize all": backfill every partition of the whole graph, as the UI does --------
    backfill_id = launch_backfill(dev, CLASSES, everything)
    print(f"[ui] backfill {backfill_id} launched after {time.monotonic() - started:.1f}s")

    backfill = wait_for_backfill(dev, backfill_id, started, BACKFILL_DEADLINE_S)
    status = backfill["status"]
    elapsed = time.monotonic() - started
    print(f"[ui] backfill {status} after {elapsed:.1f}s")
    assert backfill["isAssetBackfill"], backfill
    assert status == "COMPLETED_SUCCESS", f"the backfill ended {status} (the UI shows it failed): {backfill}"

    # The runs the daemon launched for it: all succeeded, and batching kicked in.
    runs = dev.graphql(RUNS_QUERY, {"filter": {"tags": [{"key": "dagster/backfill", "value": backfill_id}]}})
    runs = runs["runsOrError"]
    assert runs["__typename"] == "Runs", runs
    results = runs["results"]
    assert results, "the backfill launched no runs"
    assert all(r["status"] == "SUCCESS" for r in results), [(r["runId"], r["status"]) for r in results]
    ranges = []
    for run in results:
        tags = {t["key"]: t["value"] for t in run["tags"]}
        selection = sorted(p["path"][0] for p in run["assetSelection"] or [])
        ranges.append((tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")))
        print(f"[ui] run {run['runId'][:8]} {run['status']} {selection} partition={tags.get('dagster/partition')} range={ranges[-1]}")
    batched = [r for r in ranges if r[0] and r[1] and r[0] != r[1]]
    assert batched, f"no run covered several partitions (policy: {PARTITIONS_PER_RUN} per run): {ranges}"
    # Runs holding the `gpu` pool (they include vae_latents) never overlap.
    gpu_runs = sorted(
        (r["startTime"], r["endTime"], r["runId"][:8])
        for r in results
        if any(p["path"] == ["vae_latents"] for p in r["assetSelection"] or [])
    )
    overlaps = [
        (a[2], b[2]) for a, b in zip(gpu_runs, gpu_runs[1:]) if a[1] is not None and b[0] is not None and b[0] < a[1]
    ]
    print(f"[ui] runs holding the gpu pool: {len(gpu_runs)}, overlapping pairs: {overlaps or 'none'}")
    assert len(gpu_runs) >= 2 and not overlaps, f"gpu-pool runs overlapped: {overlaps}"

    # What the UI shows for each asset afterwards.
    status_nodes = {tuple(n["assetKey"]["path"]): n for n in dev.graphql(ASSET_STATUS_QUERY)["assetNodes"]}
    for name in ASSETS:
        node = status_nodes[(name,)]
        if name in PARTITIONED:
            stats = node["partitionStats"]
            assert stats["numPartitions"] == len(CLASSES), (name, stats)
            assert stats["numMaterialized"] == len(CLASSES), (name, stats)
            assert stats["numFailed"] == 0, (name, stats)
        else:
            assert node["assetMaterializations"], f"{name} has no materialization"
    # "Materialize unsynced" has nothing to offer right after "Materialize all"
    left = unsynced(dev, CLASSES)
    assert not left, f"unsynced after Materialize all: {left}"

    # ---- stop dagster dev, then check the instance and the dataset on disk ------------------
    dev.stop()
    assert dev.proc.poll() is not None, "dagster dev is still running"

    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.get() as instance:
        assert Path(instance.root_directory).resolve() == dev.home.resolve()
        materialized = instance.get_materialized_partitions(AssetKey("mds_shards"))
        assert materialized == set(CLASSES), f"mds_shards partitions materialized: {sorted(materialized)}"
        for name in ("raw_manifest", "quantization_stats", "mds_dataset", "reconstruction_report", "latent_probe"):
            assert instance.get_latest_materialization_event(AssetKey(name)) is not None, name
        # the killed build's run was failed by our sensor, saying why; nothing is left queued or started
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
        failure = instance.all_logs(killed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert len(failure) == 1 and "died without finishing it" in failure[0].message, failure
        assert f"pid {killed.tags[PID_TAG]}" in failure[0].message
        stuck = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTED]))
        assert not stuck, [(r.run_id, r.status) for r in stuck]

    import pandas as pd
    from streaming import StreamingDataset

    import imagenet_int8_assets.reader  # noqa: F401  (registers the 'uint8' latent encoding)

    index = dev.out / "mds" / "index.json"
    assert index.is_file(), f"no {index}"
    manifest = pd.read_parquet(dev.out / "manifest" / "manifest.parquet")
    ok = int((manifest["status"] == "ok").sum())
    assert ok > 0, manifest["status"].value_counts()
    assert set(manifest.loc[manifest["status"] == "ok", "class_folder"]) == set(CLASSES)

    dataset = StreamingDataset(local=str(dev.out / "mds"), batch_size=1, shuffle=False)
    try:
        assert dataset.num_samples == ok, f"{dataset.num_samples} samples in the dataset, {ok} ok rows in the manifest"
        labels = set()
        for i in range(dataset.num_samples):
            sample = dataset[i]
            values = len(sample["vae_output"])
            assert values == LATENT_BYTES, f"sample {i}: vae_output has {values} values"
            labels.add(sample["label_as_text"])
        assert len(labels) == len(CLASSES), labels
    finally:
        del dataset
    print(f"[ui] {ok} samples verified; whole test {time.monotonic() - started:.1f}s")
