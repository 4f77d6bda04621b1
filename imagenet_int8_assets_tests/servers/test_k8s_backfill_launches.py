"""Kubernetes Jobs for the runs of backfills launched by a real daemon: a real `dagster dev`
(webserver + daemon) whose instance launches runs through the recording launcher
(``support/k8s_recorder.py``); two asset backfills launched as the UI launches them (GraphQL
``launchPartitionBackfill``); the daemon creates, queues and launches their runs, and every class
run that encodes got the GPU while every other run did not. The runs are never executed (no
cluster), which is why the backfills target assets whose upstream is outside them. (The Job
specs of runs launched directly are in dagster_layer/test_kubernetes.py.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import dagster as dg
import pytest

from imagenet_int8_assets.kubernetes import GPU_POOL_ASSET_KEYS
from imagenet_int8_assets.partitions import register_classes
from imagenet_int8_assets_tests.support.dagster_dev import dagster_dev_env, launch_backfill, running_dagster_dev
from imagenet_int8_assets_tests.support.k8s_jobs import (
    CLASS_ASSETS,
    CLASSES,
    NAMESPACE,
    assert_common,
    assert_cpu_job,
    assert_gpu_job,
    gpu_limit,
    launcher_config,
    pod_spec_of,
)
from imagenet_int8_assets_tests.support.k8s_recorder import read_recorded_jobs

pytestmark = pytest.mark.timeout(300)

# How long the test waits for the daemon to launch every run it can, after the location loaded
BACKFILL_LAUNCH_DEADLINE_S = 150


@pytest.fixture
def dagster_dev_k8s(tmp_path: Path):
    """`dagster dev` on an instance whose runs are launched by the recording Kubernetes launcher;
    the class partitions registered, the gpu pool at run granularity with room for every GPU run."""
    out, home, tmp, jobs = tmp_path / "out", tmp_path / "home", tmp_path / "tmp", tmp_path / "jobs"
    for folder in (out, home, tmp):
        folder.mkdir()
    instance_yaml = {
        "run_launcher": {
            "module": "imagenet_int8_assets_tests.support.k8s_recorder",
            "class": "RecordingGpuAwareK8sRunLauncher",
            "config": {**launcher_config(tmp_path), "record_dir": str(jobs)},
        },
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {"dequeue_interval_seconds": 1},
        },
        "concurrency": {"pools": {"granularity": "run"}},
        # the launched runs never start (no cluster): nothing may fail or retry them meanwhile
        "run_monitoring": {"enabled": False},
        "run_retries": {"enabled": False},
        "telemetry": {"enabled": False},
    }
    (home / "dagster.yaml").write_text(json.dumps(instance_yaml))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        register_classes(instance, CLASSES)
        instance.event_log_storage.set_concurrency_slots("gpu", 8)
    # (its IMAGENET_INT8_VAE=tiny-random is also what the launcher passes through: env_vars)
    env = dagster_dev_env(out, home, tmp, IMAGENET_INT8_MAX_PARTITIONS_PER_RUN="2")
    with running_dagster_dev(env, tmp_path / "dagster_dev.log", out, home) as dev:
        yield dev, jobs


def test_backfill_runs_launched_by_the_daemon_get_the_gpu_config(dagster_dev_k8s):
    dev, jobs_dir = dagster_dev_k8s
    started = time.monotonic()
    # 1. class runs (2 classes per run) with the unpartitioned assets whose parents are outside
    #    the backfill, so that the daemon launches them all at once (none is ever executed)
    mixed = launch_backfill(dev, CLASSES, [*CLASS_ASSETS, "reconstruction_report", "latent_probe"])
    # 2. class runs of mds_shards alone: partitioned like the class runs, but no encode step
    shards = launch_backfill(dev, CLASSES[:2], ["mds_shards"])

    def backfill_runs(backfill_id):
        return dev_instance_runs(dev, backfill_id)

    def complete(runs_by_backfill, jobs) -> bool:
        covered = {
            backfill: [(r.asset_selection, r.tags.get("dagster/asset_partition_range_start")) for r in runs]
            for backfill, runs in runs_by_backfill.items()
        }
        mixed_assets = set().union(*[a for a, _ in covered[mixed]]) if covered[mixed] else set()
        wanted = {dg.AssetKey(a) for a in (*CLASS_ASSETS, "reconstruction_report", "latent_probe")}
        class_starts = {start for a, start in covered[mixed] if start}
        launched = {r.run_id for runs in runs_by_backfill.values() for r in runs} <= set(jobs)
        return (
            mixed_assets == wanted
            and class_starts == {CLASSES[0], CLASSES[2]}
            and len(covered[shards]) == 1
            and launched
        )

    runs_by_backfill, jobs = {}, {}
    while True:
        # the jobs first: a run is marked STARTING before its Job is built, so every run whose Job
        # was read is STARTING in the runs read after it (read the other way round, a run
        # launched in between shows QUEUED beside its Job)
        jobs = {r["job"]["metadata"]["labels"]["dagster/run-id"]: r for r in read_recorded_jobs(jobs_dir)}
        runs_by_backfill = {b: backfill_runs(b) for b in (mixed, shards)}
        if complete(runs_by_backfill, jobs):
            break
        if time.monotonic() - started > BACKFILL_LAUNCH_DEADLINE_S or dev.proc.poll() is not None:
            pytest.fail(
                f"the daemon did not launch every run of the backfills within {BACKFILL_LAUNCH_DEADLINE_S}s: runs "
                f"{ {b: [(sorted(k.to_user_string() for k in r.asset_selection or []), r.status.value) for r in rs] for b, rs in runs_by_backfill.items()} }, "
                f"jobs {sorted(jobs)}\n--- dagster dev log ---\n{dev.log_tail()}"
            )
        time.sleep(1.0)
    print(f"\n[k8s] every backfill run launched {time.monotonic() - started:.1f}s after the backfills were launched")

    gpu_runs = cpu_runs = 0
    for backfill, runs in runs_by_backfill.items():
        for run in runs:
            recorded = jobs[run.run_id]
            assert recorded["namespace"] == NAMESPACE
            job = recorded["job"]
            assert_common(job, run.run_id)
            assert run.tags["dagster/backfill"] == backfill
            assert run.status == dg.DagsterRunStatus.STARTING  # dequeued and launched by the daemon
            # nothing in the run's tags asks for Kubernetes config: the launcher decided from the plan
            assert not any(key.startswith("dagster-k8s/") for key in run.tags), run.tags
            encodes = bool(run.asset_selection & GPU_POOL_ASSET_KEYS)
            what = f"run {run.run_id} of backfill {backfill}: {sorted(k.to_user_string() for k in run.asset_selection)}"
            print(f"[k8s] {what} {run.tags.get('dagster/asset_partition_range_start', '')}: "
                  f"nodeSelector {pod_spec_of(job).get('nodeSelector')}, GPU limit {gpu_limit(job)}")
            try:
                if encodes:
                    assert "dagster/asset_partition_range_start" in run.tags
                    assert_gpu_job(job)
                    gpu_runs += 1
                else:
                    assert_cpu_job(job)
                    cpu_runs += 1
            except AssertionError as error:
                raise AssertionError(f"{what}: {error}") from error
    assert gpu_runs == 2, runs_by_backfill  # the 4 classes in runs of 2
    assert cpu_runs >= 2, runs_by_backfill  # mds_shards alone, and the unpartitioned assets


def dev_instance_runs(dev, backfill_id: str):
    """The runs of a backfill, read from the instance `dagster dev` writes to."""
    with dg.DagsterInstance.from_config(str(dev.home)) as instance:
        return list(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id})))
