"""`imagenet-int8 build` executes its class runs several at once, each in a process of its own:
real CLI subprocesses, a real instance, devices simulated by name (cpu:0, cpu:1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg

from imagenet_int8_assets_tests.conftest import BIN, cli_env, make_image_folder, run_cli
from imagenet_int8_assets.core.devices import lock_path
from imagenet_int8_assets_tests.killed_build import kill_build_during_gpu_run, run_processes

CLASSES = ["n01440764", "n01443537", "n01484850", "n01491361"]


def _shards(out: Path) -> list[tuple]:
    index = json.loads((out / "mds" / "index.json").read_text())
    return [
        (s["raw_data"]["basename"], s["samples"], s["raw_data"]["bytes"], s["raw_data"]["hashes"].get("sha1"))
        for s in index["shards"]
    ]


def _class_runs(instance: dg.DagsterInstance) -> list[dg.RunRecord]:
    return [
        r
        for r in instance.get_run_records()
        if "dagster/asset_partition_range_start" in r.dagster_run.tags
    ]


def test_runs_at_once_over_two_devices_encode_each_class_once_with_the_serial_bytes(tmp_path):
    source = make_image_folder(tmp_path / "src", {c: 3 for c in CLASSES})
    command = [str(BIN / "imagenet-int8"), "build", "--source", str(source), "--max-partitions-per-run", "1"]

    serial = cli_env(tmp_path / "serial")
    proc = run_cli([*command, "--runs-at-once", "1"], serial, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Class runs:" not in proc.stdout  # one at a time, in the build's own process

    both = cli_env(tmp_path / "both", IMAGENET_INT8_DEVICES="cpu:0,cpu:1")
    proc = run_cli(command, both, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Class runs: up to 3 at once" in proc.stdout  # one per device, one getting ready

    assert _shards(tmp_path / "both" / "out") == _shards(tmp_path / "serial" / "out")
    with dg.DagsterInstance.from_config(str(tmp_path / "both" / "out" / "dagster_home")) as instance:
        records = _class_runs(instance)
        assert len(records) == 4 and all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
        spans = sorted((r.start_time, r.end_time) for r in records)
        assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), f"no two runs overlapped: {spans}"
        leases = {}
        for key in CLASSES:  # every class encoded exactly once, by one run, on one of the two devices
            events = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("vae_latents"), asset_partitions=[key]), limit=10
            ).records
            assert len(events) == 1, key
            leases[key] = events[0].asset_materialization.metadata["device_lease"].value
        # which device each run got depends on timing (a run whose encode ends before the next one
        # leases frees cpu:0 again); two encodes at once on two devices: test_core_devices
        assert set(leases.values()) <= {"cpu:0", "cpu:1"}, leases
        for record in records:  # each run process loaded its VAE before it was given its run
            loaded = [e.user_message for e in instance.all_logs(record.dagster_run.run_id) if "Loaded VAE" in (e.user_message or "")]
            assert len(loaded) == 1 and "before the run started" in loaded[0], loaded

    # nothing left to build: the run processes started before the manifest run are ended unused
    proc = run_cli(command, both, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Class runs:" not in proc.stdout
    with dg.DagsterInstance.from_config(str(tmp_path / "both" / "out" / "dagster_home")) as instance:
        assert len(_class_runs(instance)) == 4


def test_a_run_process_that_dies_fails_its_run_and_the_build_goes_on(tmp_path):
    # the first class is big enough that its run is still encoding when the test kills it
    source = make_image_folder(tmp_path / "src", {CLASSES[0]: 40, CLASSES[1]: 2, CLASSES[2]: 2})
    env = cli_env(tmp_path)
    command = [str(BIN / "imagenet-int8"), "build", "--source", str(source), "--max-partitions-per-run", "1"]
    log = tmp_path / "build.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*command, "--runs-at-once", "2"], env=env, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT)
    home = tmp_path / "out" / "dagster_home"
    lease = lock_path(tmp_path / "out", "cpu")
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None:
            assert proc.poll() is None, f"the build ended ({proc.returncode}) first:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            if "Class runs: up to 2 at once" in log.read_text(errors="replace"):
                with dg.DagsterInstance.from_config(str(home)) as instance:
                    started = [
                        r for r in _class_runs(instance)
                        if r.dagster_run.status == dg.DagsterRunStatus.STARTED
                        and r.dagster_run.tags["dagster/asset_partition_range_start"] == CLASSES[0]
                    ]
                try:  # the device's holder: the run process of the first class, while it encodes
                    holder = json.loads(lease.read_text())
                except (OSError, ValueError):
                    holder = {}
                workers = run_processes(proc.pid)
                if started and holder.get("purpose") == started[0].dagster_run.run_id and holder.get("pid") in workers:
                    os.kill(holder["pid"], signal.SIGKILL)
                    killed = started[0].dagster_run.run_id
            time.sleep(0.05)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert proc.returncode == 1, text[-4000:]
    assert f"run {killed}:" in text
    assert "ended with signal SIGKILL before the run finished" in text, text[-4000:]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_by_id(killed)
        assert run.status == dg.DagsterRunStatus.FAILURE
        failure = instance.all_logs(killed, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert "ended with signal SIGKILL" in failure[0].message
        # the other batches still ran; the dataset waits for a build without failures
        assert instance.get_materialized_partitions(dg.AssetKey("mds_shards")) == {CLASSES[1], CLASSES[2]}
    assert not (tmp_path / "out" / "mds" / "index.json").exists()

    again = run_cli(command, env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "1 of 3 class(es) to build" in again.stdout
    assert "44 samples in 3 classes" in again.stdout


def test_class_batches_every_class_once_in_order_with_small_edges_in_big_builds():
    from imagenet_int8_assets.class_runs import class_batches, edge_size

    classes = [f"c{i:04d}" for i in range(1000)]
    batches = class_batches(classes, 125)
    assert [c for b in batches for c in b] == classes
    assert edge_size(125) == 16 and len(batches[0]) == len(batches[-1]) == 16
    assert max(len(b) for b in batches) == 125 and len(batches) == 10
    # a build of at most two full runs is cut plainly: edges would only add runs
    assert [len(b) for b in class_batches(classes[:250], 125)] == [125, 125]
    assert [len(b) for b in class_batches(classes[:3], 2)] == [2, 1]
    assert class_batches(classes[:5], 1) == [[c] for c in classes[:5]]
    assert class_batches([], 125) == []


def test_a_killed_build_leaves_no_run_process_and_the_next_build_fails_its_runs(tmp_path):
    source = make_image_folder(tmp_path / "src", {CLASSES[0]: 12, CLASSES[1]: 12})
    env, home = cli_env(tmp_path), tmp_path / "out" / "dagster_home"
    command = [str(BIN / "imagenet-int8"), "build", "--source", str(source), "--max-partitions-per-run", "1"]
    # kill -9 while a class run is STARTED; the helper also asserts the run processes died with it
    killed = kill_build_during_gpu_run([*command, "--runs-at-once", "2"], env, tmp_path, home, tmp_path / "killed.log")
    again = run_cli(command, env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "left unfinished by imagenet-int8 builds whose process died as failed" in again.stdout
    assert killed.run_id in again.stdout
    assert "24 samples in 2 classes" in again.stdout
