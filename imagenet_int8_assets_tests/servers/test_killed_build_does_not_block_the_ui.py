"""A killed `imagenet-int8 build` does not block the UI.

A real build is killed with SIGKILL while its batched run holds the `gpu` pool (granularity run,
limit 1), which leaves that run STARTED for good. Then a real `dagster dev` (webserver + daemon)
on the same DAGSTER_HOME and output gets a backfill of the whole graph through GraphQL, as the UI
sends it. Nobody runs the CLI again: our sensor must fail the dead run, so that the backfill's
gpu run is not held in QUEUED ("blocked by global concurrency limits") and the backfill builds a
readable dataset.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from imagenet_int8_assets.core.common.layout import manifest_path, mds_root
from imagenet_int8_assets.build.dead_runs import PID_TAG
from imagenet_int8_assets_tests.support.builds import make_image_folder
from imagenet_int8_assets_tests.support.dagster_dev import (
    dagster_dev_env,
    launch_backfill,
    running_dagster_dev,
    wait_for_backfill,
)
from imagenet_int8_assets_tests.support.killed_build import kill_build_during_gpu_run

CLASSES = ["n01440764", "n02102040"]
ASSETS = [
    "raw_manifest", "preprocessed_crops", "vae_latents", "quantization_stats", "mds_shards", "mds_dataset",
    "reconstruction_report", "probe_features", "latent_probe",
]
BACKFILL_DEADLINE_S = 420  # from the start of the test; the rest of the 600 s is for checks and teardown


@pytest.mark.timeout(600)
def test_backfill_from_the_ui_proceeds_after_a_build_was_killed_holding_the_gpu_pool(tmp_path: Path, own_tmpdir: Path):
    started = time.monotonic()
    source = make_image_folder(tmp_path / "src", {name: 3 for name in CLASSES})
    out = tmp_path / "out"
    home = out / "dagster_home"  # the CLI's default; `dagster dev` is pointed at it as the README says
    env = dagster_dev_env(
        out, home, own_tmpdir, IMAGENET_INT8_SOURCE=str(source), IMAGENET_INT8_MAX_PARTITIONS_PER_RUN=str(len(CLASSES))
    )
    build_env = {k: v for k, v in env.items() if k != "DAGSTER_HOME"}
    command = [str(Path(sys.executable).parent / "imagenet-int8"), "build"]

    killed = kill_build_during_gpu_run(command, build_env, tmp_path, home, tmp_path / "build.log")
    print(f"\n[ui] build killed during run {killed.run_id[:8]} after {time.monotonic() - started:.1f}s")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.STARTED

    with running_dagster_dev(env, tmp_path / "dagster_dev.log", out, home) as dev:
        backfill_id = launch_backfill(dev, CLASSES, ASSETS)
        print(f"[ui] backfill {backfill_id} launched after {time.monotonic() - started:.1f}s")
        backfill = wait_for_backfill(dev, backfill_id, started, BACKFILL_DEADLINE_S)
        assert all(run["status"] == "SUCCESS" for run in backfill["runs"]), backfill["runs"]
        print(f"[ui] backfill {backfill['status']} after {time.monotonic() - started:.1f}s")

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
        failure = instance.all_logs(killed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert len(failure) == 1 and "died without finishing it" in failure[0].message, failure
        assert f"pid {killed.tags[PID_TAG]}" in failure[0].message
        active = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTED]
        stuck = instance.get_runs(filters=dg.RunsFilter(statuses=active))
        assert not stuck, [(r.run_id, r.status) for r in stuck]

    from imagenet_int8_assets.reader import open_dataset

    manifest = pd.read_parquet(manifest_path(out))
    ok = int((manifest["status"] == "ok").sum())
    dataset = open_dataset(str(mds_root(out)), batch_size=1, shuffle=False)
    try:
        assert len(dataset) == ok == 3 * len(CLASSES), (len(dataset), ok)
        labels = {dataset[i]["label_as_text"] for i in range(len(dataset))}
        assert len(labels) == len(CLASSES), labels
    finally:
        del dataset
    print(f"[ui] {ok} samples read back; whole test {time.monotonic() - started:.1f}s")
