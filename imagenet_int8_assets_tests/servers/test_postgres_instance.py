"""The Dagster instance on PostgreSQL (a real server started here) and the dataset on S3-compatible
object storage (moto's server mode): a CLI build spread over two concurrent runs, and a backfill
launched through the real webserver and daemon (`dagster dev`)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import dagster as dg
import pytest

from imagenet_int8_assets.core.dataset.mds_remote import RemoteMds
from imagenet_int8_assets.build.instance import SHIPPED_POSTGRES_YAML, prepare_dagster_home
from imagenet_int8_assets.reader import open_dataset
from imagenet_int8_assets_tests.support.builds import BIN, cli_env, make_image_folder, run_cli
from imagenet_int8_assets_tests.support.dagster_dev import (
    RUNS_QUERY,
    dagster_dev_env,
    dev_folders,
    launch_backfill,
    running_dagster_dev,
    wait_for_backfill,
    wait_for_classes,
)

CLASSES = ["n01440764", "n01443537", "n01484850", "n01491361"]
CLASS_STEPS = ["preprocessed_crops", "vae_latents", "mds_shards"]


def _instance(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(home))


def _class_runs(instance: dg.DagsterInstance) -> list[dg.RunRecord]:
    return [r for r in instance.get_run_records() if "dagster/asset_partition_range_start" in r.dagster_run.tags]


def _overlapping(records: list[dg.RunRecord]) -> bool:
    spans = sorted((r.start_time, r.end_time) for r in records)
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


def _samples(dataset) -> list[tuple]:
    return [(s["label"], s["label_as_text"], s["latent"].tobytes()) for s in (dataset[i] for i in range(len(dataset)))]


@pytest.mark.timeout(600)
def test_two_concurrent_runs_on_postgres_publish_to_s3_the_dataset_of_one_run(postgres, s3, tmp_path, monkeypatch):
    source = make_image_folder(tmp_path / "src", {c: 3 for c in CLASSES})
    bucket = s3.new_bucket()
    command = [str(BIN / "imagenet-int8"), "build", "--source", str(source)]

    # reference: the default single-node setup (SQLite), every class in one run
    one = cli_env(tmp_path / "one", **s3.env(), IMAGENET_INT8_MDS_REMOTE=f"s3://{bucket}/one")
    proc = run_cli([*command, "--max-partitions-per-run", "4", "--runs-at-once", "1"], one, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # the cluster's setup: the PostgreSQL instance, two devices, two batched class runs at once
    db = postgres.create_database()
    two = cli_env(
        tmp_path / "two", **s3.env(), **postgres.env(db),
        IMAGENET_INT8_MDS_REMOTE=f"s3://{bucket}/two", IMAGENET_INT8_DEVICES="cpu:0,cpu:1",
    )
    proc = run_cli([*command, "--max-partitions-per-run", "2", "--runs-at-once", "2"], two, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Class runs: up to 2 at once" in proc.stdout, proc.stdout[-3000:]
    assert f"(published to s3://{bucket}/two too)" in proc.stdout

    home = tmp_path / "two" / "out" / "dagster_home"
    for name, value in {**postgres.env(db), **s3.env()}.items():  # this process reads the instance and the bucket
        monkeypatch.setenv(name, value)
    assert (home / "dagster.yaml").read_text() == SHIPPED_POSTGRES_YAML.read_text()
    assert not (home / "history").exists()  # nothing went to SQLite
    with _instance(home) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        records = _class_runs(instance)
        assert len(records) == 2 and all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
        assert _overlapping(records), [(r.start_time, r.end_time) for r in records]
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 2  # one per device
        run_ids = {r.dagster_run.run_id for r in instance.get_run_records()}
        metadata = instance.get_latest_materialization_event(dg.AssetKey("mds_dataset")).asset_materialization.metadata
        assert metadata["remote"].value == f"s3://{bucket}/two" and metadata["remote_published"].value == "new index"
        # the class runs uploaded their versions: mds_dataset found them there
        assert metadata["remote_uploaded_files"].value == 0, metadata
    assert {row[0] for row in postgres.query(db, "SELECT run_id FROM runs")} == run_ids

    # the two buckets' datasets are the same objects, and streaming reads the same samples from both
    listed = {name: RemoteMds(f"s3://{bucket}/{name}", client=s3.client()).list_sizes() for name in ("one", "two")}
    assert listed["one"] == listed["two"] and "index.json" in listed["two"], listed
    client = s3.client()
    index = {n: client.get_object(Bucket=bucket, Key=f"{n}/index.json")["Body"].read() for n in ("one", "two")}
    assert index["one"] == index["two"] == (tmp_path / "one" / "out" / "mds" / "index.json").read_bytes()
    remote = open_dataset(f"s3://{bucket}/two", local=tmp_path / "cache")
    assert _samples(remote) == _samples(open_dataset(tmp_path / "one" / "out" / "mds"))
    assert len(remote) == 4 * 3


@pytest.mark.timeout(600)
def test_a_backfill_through_the_webserver_and_daemon_on_postgres_runs_two_batched_runs_at_once(
    postgres, tmp_path, monkeypatch
):
    out, home, tmp = dev_folders(tmp_path)
    db = postgres.create_database()
    source = make_image_folder(tmp_path / "src", {c: 3 for c in CLASSES})
    settings = dict(
        IMAGENET_INT8_SOURCE=str(source), IMAGENET_INT8_MAX_PARTITIONS_PER_RUN="2", IMAGENET_INT8_DEVICES="cpu:0,cpu:1",
    )
    env = dagster_dev_env(out, home, tmp, **settings, **postgres.env(db))
    for name, value in {**postgres.env(db), **settings, "DAGSTER_HOME": str(home), "TMPDIR": str(tmp)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    prepare_dagster_home(home)  # what `imagenet-int8` does: the PostgreSQL dagster.yaml, gpu pool = 2 devices
    assert (home / "dagster.yaml").read_text() == SHIPPED_POSTGRES_YAML.read_text()

    started = time.monotonic()
    with running_dagster_dev(env, tmp_path / "dagster_dev.log", out, home) as dev:
        wait_for_classes(dev, CLASSES)
        backfill_id = launch_backfill(dev, CLASSES, ["raw_manifest", *CLASS_STEPS, "quantization_stats", "mds_dataset"])
        backfill = wait_for_backfill(dev, backfill_id, started, 480)
        assert backfill["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), backfill
        runs = dev.graphql(RUNS_QUERY, {"filter": {"tags": [{"key": "dagster/backfill", "value": backfill_id}]}})
        results = runs["runsOrError"]["results"]
        assert results and all(r["status"] == "SUCCESS" for r in results), results

    with _instance(home) as instance:
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 2
        records = _class_runs(instance)
        ranges = sorted(
            (r.dagster_run.tags["dagster/asset_partition_range_start"], r.dagster_run.tags["dagster/asset_partition_range_end"])
            for r in records
        )
        assert ranges == [(CLASSES[0], CLASSES[1]), (CLASSES[2], CLASSES[3])]  # two batched runs of two classes
        # the gpu pool allows two runs (one per device): the daemon started both before either ended
        assert _overlapping(records), [(r.start_time, r.end_time) for r in records]
        assert instance.get_materialized_partitions(dg.AssetKey("mds_shards")) == set(CLASSES)
    assert json.loads((out / "mds" / "index.json").read_text())["imagenet_int8"]["samples"] == 4 * 3
    assert {r["runId"] for r in results} <= {row[0] for row in postgres.query(db, "SELECT run_id FROM runs")}
