"""The user's ordinary path through the real UI stack, end to end: `imagenet-int8 demo`, then the
`dagster dev` line it prints, run verbatim in a bare offline shell (a real webserver + daemon), on
an output where a build was killed.

1. The demo builds the bundled sample (4 classes) with a VAE that is not available offline, so it
   falls back to random weights (tiny-random here) and prints the UI line with that fallback.
2. A real `imagenet-int8 build --force` with the same settings is killed with SIGKILL while its
   batched run holds the `gpu` pool (granularity run, limit 1), which leaves that run STARTED for
   good. Nobody runs the CLI again: our sensor must fail the dead run, so that the backfill's gpu
   runs are not held in QUEUED ("blocked by global concurrency limits").
3. The printed line serves the whole asset graph with its class partitions; the user's first click,
   "Materialize all" (a backfill of every materializable asset over every partition, launched the
   way the UI launches it: the GraphQL mutation ``launchPartitionBackfill`` posted to
   ``/graphql``), is carried out by the daemon, ends with the BACKFILL's status "completed
   successfully" (not only its runs), leaves nothing for "Materialize unsynced", and publishes
   byte for byte the demo's dataset, made with the same (fallback) VAE, which StreamingDataset reads.

Tiny random VAE on CPU; no network, no mocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from pathlib import Path

import dagster as dg
import pytest

from imagenet_int8_assets.build.dead_runs import PID_TAG
from imagenet_int8_assets_tests.support.builds import BIN, cli_env, run_cli
from imagenet_int8_assets_tests.support.dagster_dev import (
    ASSET_NODES_QUERY,
    ASSET_STATUS_QUERY,
    LOCATION,
    RUNS_QUERY,
    free_port,
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
VAE_ID = "some-org/not-a-cached-vae"
UI_LINE_HEADER = "See the runs and assets in the UI:"

# The backfill must finish this long after the test starts, leaving the rest of the pytest-timeout
# for the checks and the teardown (so a slow run fails with diagnostics).
BACKFILL_DEADLINE_S = 600


def published_shards(mds: Path) -> dict[str, str]:
    """Every file that mds/index.json publishes (its shards), by path, with its hash."""
    index = json.loads((mds / "index.json").read_text())
    files = {}
    for shard in index["shards"]:
        for part in ("raw_data", "zip_data"):
            info = shard.get(part)
            if info:
                files[info["basename"]] = hashlib.sha256((mds / info["basename"]).read_bytes()).hexdigest()
    return files


# ------------------------------------------------------------------------------------------
# fixture


@pytest.fixture
def demo_killed_build_then_dagster_dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The demo, a build killed while its run holds the gpu pool, then the demo's printed
    `dagster dev` line in a bare shell; yields (demo facts, the killed run, the DagsterDev)."""
    started = time.monotonic()
    env = cli_env(
        tmp_path, IMAGENET_INT8_VAE=VAE_ID, IMAGENET_INT8_DEMO_VAE_FALLBACK="tiny-random",
        IMAGENET_INT8_MAX_PARTITIONS_PER_RUN=str(PARTITIONS_PER_RUN),
    )
    demo = run_cli([str(BIN / "imagenet-int8"), "demo"], env, timeout=300)
    assert demo.returncode == 0, f"demo failed ({demo.returncode}):\n{demo.stdout[-5000:]}\n{demo.stderr[-10000:]}"
    print(f"\n[ui] demo built in {time.monotonic() - started:.1f}s")
    assert "WARNING: real VAE weights were not available" in demo.stdout, demo.stdout
    lines = demo.stdout.splitlines()
    assert UI_LINE_HEADER in lines, f"no {UI_LINE_HEADER!r} in the demo's output:\n{demo.stdout}"
    line = lines[lines.index(UI_LINE_HEADER) + 1].strip()
    print(f"[ui] printed: {line}")
    words = shlex.split(line)
    assignments = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    assert assignments.get("IMAGENET_INT8_VAE_FALLBACK") == "tiny-random", line
    assert assignments.get("IMAGENET_INT8_VAE") == VAE_ID, line
    assert assignments.get("IMAGENET_INT8_MAX_PARTITIONS_PER_RUN") == str(PARTITIONS_PER_RUN), line
    home, out = Path(assignments["DAGSTER_HOME"]), Path(assignments["IMAGENET_INT8_OUTPUT"])
    mds = out / "mds"
    facts = {"mds": mds, "index": (mds / "index.json").read_bytes(), "shards": published_shards(mds)}
    assert facts["shards"], "the demo published no shards"

    # A user's bare shell, offline. The printed line runs verbatim; the port comes from the
    # environment (dagster dev passes no --port, so dagster-webserver reads DAGSTER_WEBSERVER_PORT)
    # so that the test does not depend on port 3000 being free.
    port = free_port()
    tmp = tmp_path / "shell-tmp"
    tmp.mkdir()
    shell_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "TMPDIR": str(tmp),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        "DAGSTER_WEBSERVER_PORT": str(port),
    }
    if "OMP_NUM_THREADS" in env:  # the demo's: build.json records the CPU thread count (part of a class version)
        shell_env["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"]

    # The same settings, from the CLI: `build --force` killed while its first class run holds the gpu pool.
    killed = kill_build_during_gpu_run(
        [str(BIN / "imagenet-int8"), "build", "--force"], {**shell_env, **assignments}, tmp_path, home,
        tmp_path / "build.log",
    )
    print(f"[ui] build killed during run {killed.run_id[:8]} after {time.monotonic() - started:.1f}s")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.STARTED

    # This process reads the same instance and writes streaming's temporary files under tmp too.
    use_home(monkeypatch, home, tmp)
    with running_dagster_dev(
        shell_env, tmp_path / "dagster_dev.log", out, home, command=["bash", "-c", line], cwd=tmp_path, port=port
    ) as dev:
        print(f"[ui] the printed line serves on port {port} after {time.monotonic() - started:.1f}s")
        yield facts, killed, dev


# ------------------------------------------------------------------------------------------
# the test


@pytest.mark.timeout(900)
def test_demo_then_its_printed_ui_after_a_killed_build_materialize_all_republishes_the_same_dataset(
    demo_killed_build_then_dagster_dev,
):
    demo, killed, dev = demo_killed_build_then_dagster_dev
    started = time.monotonic()

    # ---- (1) the UI serves the whole graph with its class partitions ---------------------
    entry = next(e for e in dev.served["workspace"]["locationEntries"] if e["name"] == LOCATION)
    location = entry["locationOrLoadError"]
    assert location["__typename"] == "RepositoryLocation", f"location failed to load: {location}"
    assert location["repositories"], "the location has no repository"
    print(f"\n[ui] location loaded after {time.monotonic() - started:.1f}s")

    wait_for_classes(dev, CLASSES)  # registered by the demo's scan
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
        # every class was encoded by the backfill with the demo's VAE (its fallback, recorded as such)
        for key in CLASSES:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=AssetKey("vae_latents"), asset_partitions=[key]), limit=1
            ).records
            assert records, f"vae_latents[{key}] has no materialization"
            entry = records[0].event_log_entry
            assert instance.get_run_by_id(entry.run_id).tags.get("dagster/backfill") == backfill_id, key
            metadata = entry.asset_materialization.metadata
            assert metadata["vae"].value == VAE_ID and metadata["vae_fallback"].value is True, (key, metadata["vae"])

    # ---- the same dataset as the demo's, byte for byte ---------------------------------------
    shards_after = published_shards(demo["mds"])
    assert shards_after == demo["shards"], f"the UI backfill published other shards:\nbefore {demo['shards']}\nafter  {shards_after}"
    assert (demo["mds"] / "index.json").read_bytes() == demo["index"], "mds/index.json changed after the UI backfill"

    import pandas as pd
    from imagenet_int8_assets.core.dataset.mds import open_streaming

    import imagenet_int8_assets.reader  # noqa: F401  (registers the 'uint8' latent encoding)

    index = dev.out / "mds" / "index.json"
    assert index.is_file(), f"no {index}"
    manifest = pd.read_parquet(dev.out / "manifest" / "manifest.parquet")
    ok = int((manifest["status"] == "ok").sum())
    assert ok > 0, manifest["status"].value_counts()
    assert set(manifest.loc[manifest["status"] == "ok", "class_folder"]) == set(CLASSES)

    dataset = open_streaming(local=str(dev.out / "mds"), batch_size=1, shuffle=False)
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
