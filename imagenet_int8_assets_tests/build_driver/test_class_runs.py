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
import pytest

from imagenet_int8_assets_tests.support.builds import BIN, cli_env, make_image_folder, run_cli
from imagenet_int8_assets.core.latents.devices import lock_path
from imagenet_int8_assets_tests.support.killed_build import alive, kill_build_during_gpu_run, run_processes

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


@pytest.mark.slow
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
        # leases frees cpu:0 again); two encodes at once on two devices: core/latents/test_devices.py
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


@pytest.mark.slow
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


def test_a_runs_failure_block_is_one_form_for_in_process_and_class_runs():
    """The block the build prints for a run, wherever the run executed (the manifest and dataset
    runs in the build's process, class runs in processes of their own)."""
    from imagenet_int8_assets.build.run_events import run_failure_block

    assert run_failure_block("r1", [], True) == []
    assert run_failure_block("r1", [], False) == ["run r1:", "  failed"]
    assert run_failure_block("r2", ["vae_latents: out of memory", "check x failed: y"], True) == [
        "run r2:", "  vae_latents: out of memory", "  check x failed: y",
    ]


def test_class_batches_every_class_once_in_order_with_small_edges_in_big_builds():
    from imagenet_int8_assets.build.class_runs import class_batches, edge_size

    classes = [f"c{i:04d}" for i in range(1000)]
    batches = class_batches(classes, classes, 125)
    assert [c for b in batches for c in b] == classes
    assert edge_size(125) == 16 and len(batches[0]) == len(batches[-1]) == 16
    assert max(len(b) for b in batches) == 125 and len(batches) == 10
    # a build of at most two full runs is cut plainly: edges would only add runs
    assert [len(b) for b in class_batches(classes[:250], classes[:250], 125)] == [125, 125]
    assert [len(b) for b in class_batches(classes[:3], classes[:3], 2)] == [2, 1]
    assert class_batches(classes[:5], classes[:5], 1) == [[c] for c in classes[:5]]
    assert class_batches(classes, [], 125) == []


def _covered(instance: dg.DagsterInstance, run: list[str]) -> list[str]:
    """What a run tagged with the partition range run[0] .. run[-1] materializes: Dagster's own
    reading of the range over the class partitions registered in ``instance``."""
    from dagster._core.definitions.partitions.context import partition_loading_context

    from imagenet_int8_assets.partitions import class_partitions

    with partition_loading_context(dynamic_partitions_store=instance):
        return class_partitions.get_partition_keys_in_range(dg.PartitionKeyRange(run[0], run[-1]))


def test_class_batches_follow_the_registration_order_and_cover_exactly_the_classes_to_build():
    """Dagster orders dynamic partitions by registration: a class added later ("a" after "b", "c")
    comes last whatever its name. Every run's range must cover exactly its classes in that order
    (sorted ranges made "a".."c" an empty range: the run built nothing)."""
    from imagenet_int8_assets.build.class_runs import class_batches
    from imagenet_int8_assets.partitions import partition_order, register_classes

    with dg.DagsterInstance.ephemeral() as instance:
        register_classes(instance, ["b", "c"])  # the first scan
        register_classes(instance, ["a", "b", "c"])  # "a" added later
        order = partition_order(instance)
        assert order == ["b", "c", "a"]
        runs = class_batches(order, ["a", "b", "c"], 125)
        assert runs == [["b", "c", "a"]]
        assert [_covered(instance, run) for run in runs] == runs
    # classes that are up to date, vanished or another output's break a run: never rebuilt or refused
    with dg.DagsterInstance.ephemeral() as instance:
        register_classes(instance, [f"k{i}" for i in range(10)])
        register_classes(instance, ["a0"])
        order = partition_order(instance)
        todo = ["k1", "k2", "k5", "k9", "a0"]
        runs = class_batches(order, todo, 3)
        assert runs == [["k1", "k2"], ["k5"], ["k9", "a0"]]
        assert [_covered(instance, run) for run in runs] == runs
    assert class_batches(order, ["not-registered"], 3) == []


@pytest.mark.slow
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


def _two_class_build(tmp_path: Path, runs_at_once: str) -> tuple[subprocess.Popen, Path]:
    """`imagenet-int8 build --runs-at-once N` of two one-image classes, one class per run, started in
    the background; returns the process and its log."""
    source = make_image_folder(tmp_path / "src", {CLASSES[0]: 1, CLASSES[1]: 1})
    command = [str(BIN / "imagenet-int8"), "build", "--source", str(source), "--max-partitions-per-run", "1"]
    log = tmp_path / "build.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [*command, "--runs-at-once", runs_at_once], env=cli_env(tmp_path), cwd=tmp_path, stdout=fh,
            stderr=subprocess.STDOUT,
        )
    return proc, log


@pytest.mark.slow
def test_runs_at_once_never_starts_more_run_processes_than_batches_and_bounds_by_memory(tmp_path):
    """--runs-at-once 1000 on a two-class source (one class per run): at most two run processes
    ever exist (a user saw 636 start and the machine run out of memory)."""
    from imagenet_int8_assets.build.class_runs import available_memory, run_process_bytes, runs_at_once_limit
    from imagenet_int8_assets.resources import ImagenetInt8Settings

    proc, log = _two_class_build(tmp_path, "1000")
    most, deadline = 0, time.monotonic() + 300
    try:
        while proc.poll() is None:
            most = max(most, len(run_processes(proc.pid)))
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-4000:]
    assert 1 <= most <= 2, f"{most} run processes for 2 class runs"
    assert "Class runs: up to 2 at once" in log.read_text()

    # memory: no more processes than 80 % of the available memory holds, each about its VAE + imports
    settings = ImagenetInt8Settings(output=str(tmp_path / "m"), vae="sdxl-random")
    each = run_process_bytes(settings)
    assert each > run_process_bytes(ImagenetInt8Settings(output=str(tmp_path / "m"), vae="tiny-random"))
    limit, note = runs_at_once_limit(settings, 10**6, 10**6)
    available = available_memory()
    assert available is not None and limit == max(1, int(available * 0.8 // each))
    assert note is not None and "GiB" in note and "--runs-at-once" in note
    assert runs_at_once_limit(settings, 3, 1) == (1, None)  # one batch: one process


def test_a_run_process_can_die_with_the_build_before_its_heavy_imports():
    """A run process sets its parent-death signal as its first act, before importing dagster or torch
    (a spawned child imports the module of its target first): a build killed while its run processes
    are still starting leaves none of them importing on (seen: hundreds alive minutes later)."""
    import sys

    code = (
        "import sys, imagenet_int8_assets.build.class_runs as m; "
        "heavy = [n for n in ('dagster', 'torch', 'diffusers', 'streaming', 'pandas') if n in sys.modules]; "
        "assert not heavy, heavy; assert callable(m.run_process)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_a_build_killed_while_its_run_processes_start_leaves_none(tmp_path):
    proc, log = _two_class_build(tmp_path, "2")
    try:
        deadline = time.monotonic() + 300
        while len(children := run_processes(proc.pid)) < 2:  # both started: still importing
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    gone = time.monotonic() + 30
    while any(alive(c) for c in children) and time.monotonic() < gone:
        time.sleep(0.05)
    assert not any(alive(c) for c in children), f"run processes outlived the build: {children}"


def test_warm_imports_name_real_modules_and_a_moved_one_fails_loudly():
    import importlib.util

    import pytest

    from imagenet_int8_assets.build.class_runs import DATASET_RUN_IMPORTS, MissingWarmImport, warm_imports

    assert [name for name in DATASET_RUN_IMPORTS if importlib.util.find_spec(name) is None] == []
    warm_imports(("imagenet_int8_assets.core.common.files",)).join()  # real modules: nothing raised
    moved = "imagenet_int8_assets.core.quality.no_such_module"
    with pytest.raises(MissingWarmImport, match="no_such_module.*DATASET_RUN_IMPORTS"):
        warm_imports(("imagenet_int8_assets.core.common.files", moved)).join()
