"""The published dataset (mds/index.json) changes only when mds_dataset publishes a complete,
consistent version; readers of the previous version keep reading it, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import dagster as dg
import numpy as np
import pytest

from imagenet_int8_assets.build.driver import _failures as failures
from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.common.layout import mds_root
from imagenet_int8_assets.definitions import build_definitions
from imagenet_int8_assets.reader import open_dataset
from imagenet_int8_assets.resources import ImagenetInt8Settings
from imagenet_int8_assets_tests.support.builds import BIN, cli_env, make_image_folder, materialize_all

PARTITIONED = [dg.AssetKey(k) for k in ("preprocessed_crops", "vae_latents", "mds_shards")]


def _samples(root) -> list[tuple[bytes, int]]:
    ds = open_dataset(root)
    return [(ds[i]["latent"].tobytes(), ds[i]["label"]) for i in range(ds.num_samples)]


def _settings(tmp_path, **kw) -> ImagenetInt8Settings:
    values = dict(vae="tiny-random", device="cpu", workers=1, report_per_class=1)
    return ImagenetInt8Settings(source=str(tmp_path / "src"), output=str(tmp_path / "out"), **{**values, **kw})


def _rematerialize_class(settings, instance, key):
    job = build_definitions(settings, partitions_per_run=3).resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=instance, partition_key=key, asset_selection=PARTITIONED)
    assert result.success


def _publish(settings, instance):
    job = build_definitions(settings, partitions_per_run=3).resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("mds_dataset")],
        raise_on_error=False,
    )


@pytest.mark.slow
def test_rematerializing_a_class_leaves_the_published_dataset_alone_until_it_is_republished(tmp_path):
    make_image_folder(tmp_path / "src", {"a": 3, "b": 4, "c": 2})
    settings = _settings(tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    assert all(r.success for r in materialize_all(build_definitions(settings, partitions_per_run=3), instance, 3))
    root = mds_root(settings.output_path)
    published = (root / "index.json").read_bytes()
    old = _samples(root)
    held = open_dataset(root)  # a reader that opened the published version before anything changed
    assert held.num_samples == len(old) == 9

    # Other settings are refused up front by the output's settings record ...
    refused = build_definitions(_settings(tmp_path, seed=7), partitions_per_run=3).resolve_implicit_global_asset_job_def()
    result = refused.execute_in_process(
        instance=instance, partition_key="b", asset_selection=[dg.AssetKey("preprocessed_crops")], raise_on_error=False
    )
    assert not result.success and "IMAGENET_INT8_SEED: the output holds 0, this launch has 7" in " ".join(failures(result))
    # ... and, for an output without the record (an older one), by the merge itself:
    (settings.output_path / "settings.json").unlink()
    # another seed, then a 16-channel VAE, for one class: the published dataset does not move
    for other in (_settings(tmp_path, seed=7), _settings(tmp_path, vae="tiny-random-16")):
        _rematerialize_class(other, instance, "b")
        assert (root / "index.json").read_bytes() == published
        assert _samples(root) == old
        refused = _publish(other, instance)
        assert not refused.success  # the merge refuses classes built with different settings
        assert "different settings" in " ".join(failures(refused)), failures(refused)
        assert (root / "index.json").read_bytes() == published and _samples(root) == old

    # the whole dataset with another seed: a new version is published in one step
    seed7 = _settings(tmp_path, seed=7)
    for key in ("a", "b", "c"):
        _rematerialize_class(seed7, instance, key)
    assert _publish(seed7, instance).success
    new = _samples(root)
    assert len(new) == 9 and new != old and [label for _, label in new] == [label for _, label in old]
    record = json.loads((root / "index.json").read_text())["imagenet_int8"]
    assert record["seed"] == 7 and record["per_class"] == {"a": 3, "b": 4, "c": 2}
    # the reader that held the previous version still reads it, byte for byte
    assert [(held[i]["latent"].tobytes(), held[i]["label"]) for i in range(held.num_samples)] == old
    # on disk: the published versions and the previous ones, nothing else
    named = {(root / s["raw_data"]["basename"]).parent for s in json.loads((root / "index.json").read_text())["shards"]}
    previous = {(root / s["raw_data"]["basename"]).parent for s in json.loads(published)["shards"]}
    on_disk = {p for p in (root / "classes").glob("*/v-*")}
    assert on_disk == named | previous
    assert not [p for p in root.rglob(".tmp-*")]


KILL_LOOP = textwrap.dedent(
    """
    import json, sys
    from imagenet_int8_assets.core.dataset import mds_index
    root, a, b = sys.argv[1], json.loads(open(sys.argv[2]).read()), json.loads(open(sys.argv[3]).read())
    print("ready", flush=True)
    while True:
        for doc in (a, b):
            mds_index.swap_in_index(root, {k: v for k, v in doc.items() if k != "imagenet_int8"}, doc["imagenet_int8"])
    """
)


@pytest.mark.slow
def test_a_publication_killed_at_any_moment_leaves_one_whole_version(tmp_path):
    """SIGKILL a process that publishes two versions in a loop: index.json is always one of them."""
    make_image_folder(tmp_path / "src", {"a": 2, "b": 3})
    instance = dg.DagsterInstance.ephemeral()
    settings = _settings(tmp_path)
    assert all(r.success for r in materialize_all(build_definitions(settings, partitions_per_run=3), instance, 3))
    root = mds_root(settings.output_path)
    version_a = (root / "index.json").read_bytes()
    seed3 = _settings(tmp_path, seed=3)
    seed3.record_settings(replace=True)  # what `imagenet-int8 build --force` does before rebuilding
    for key in ("a", "b"):
        _rematerialize_class(seed3, instance, key)
    assert _publish(seed3, instance).success
    version_b = (root / "index.json").read_bytes()
    assert version_a != version_b
    (tmp_path / "a.json").write_bytes(version_a)
    (tmp_path / "b.json").write_bytes(version_b)
    expected = {version_a: None, version_b: None}
    for which in (version_a, version_b):
        (root / "index.json").write_bytes(which)
        expected[which] = _samples(root)
    assert expected[version_a] != expected[version_b]

    rng = np.random.default_rng(0)
    for attempt in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_LOOP, str(root), str(tmp_path / "a.json"), str(tmp_path / "b.json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        current = (root / "index.json").read_bytes()
        assert current in expected, f"attempt {attempt}: index.json is neither version"
        assert _samples(root) == expected[current]


@pytest.mark.slow
def test_a_build_killed_after_remaking_a_class_keeps_the_previous_dataset(tmp_path):
    """The real CLI, killed once a class has a new version: readers see the old dataset; a re-run
    publishes the new one, complete."""
    source = make_image_folder(tmp_path / "src", {f"c{i}": 3 for i in range(4)})
    env = cli_env(tmp_path, IMAGENET_INT8_REPORT_PER_CLASS="1")
    args = [str(BIN / "imagenet-int8"), "build", "--source", str(source), "--max-partitions-per-run", "1"]
    first = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    root = tmp_path / "out" / "mds"
    published = (root / "index.json").read_bytes()
    old = _samples(root)
    held = open_dataset(root)
    pointer = mds_index.class_home(root, "c0") / mds_index.CURRENT
    before = pointer.read_bytes()

    # another seed changes the bytes: the output's recorded settings need --force to be replaced
    forced = [*args, "--force"]
    proc = subprocess.Popen(
        forced, env={**env, "IMAGENET_INT8_SEED": "5"}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and pointer.read_bytes() == before and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, f"the forced build exited ({proc.returncode}) before re-making class c0"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert pointer.read_bytes() != before, "the build stalled before re-making class c0"
    assert (root / "index.json").read_bytes() == published
    assert _samples(root) == old
    assert [(held[i]["latent"].tobytes(), held[i]["label"]) for i in range(held.num_samples)] == old

    rerun = subprocess.run(forced, env={**env, "IMAGENET_INT8_SEED": "5"}, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    new = _samples(root)
    assert len(new) == len(old) == 12 and new != old
    assert json.loads((root / "index.json").read_text())["imagenet_int8"]["seed"] == 5
    assert not [p for p in (tmp_path / "out").rglob(".tmp-*")] and not [p for p in (tmp_path / "out").rglob(".trash-*")]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["index.json", "build.json", "classes"])
def test_class_named_like_the_datasets_own_files(tmp_path, name):
    """A class folder named index.json (or build.json, classes) cannot collide with the layout."""
    make_image_folder(tmp_path / "src", {name: 2, "other": 2})
    settings = _settings(tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    results = materialize_all(build_definitions(settings, partitions_per_run=3), instance, 3)
    assert all(r.success for r in results)
    root = mds_root(settings.output_path)
    assert (root / "index.json").is_file() and (root / "build.json").is_file()
    samples = _samples(root)
    assert len(samples) == 4
    texts = {open_dataset(root)[i]["label_as_text"] for i in range(4)}
    assert texts == {name, "other"}


@pytest.mark.slow
def test_a_damaged_class_is_not_published_and_rebuilding_it_repairs_the_dataset(tmp_path):
    """The reader's advice ("rebuild class X, then mds_dataset") works: the rebuilt version has the
    same content id as the damaged one, which is replaced instead of kept."""
    from imagenet_int8_assets.reader import DatasetDamaged

    make_image_folder(tmp_path / "src", {"a": 2, "b": 3})
    settings = _settings(tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    assert all(r.success for r in materialize_all(build_definitions(settings, partitions_per_run=3), instance, 3))
    root = mds_root(settings.output_path)
    good = _samples(root)
    shard = next(mds_index.current_version_dir(root, "b").glob("shard.*.mds"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # a bit flip inside a latent
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetDamaged, match="rebuild class 'b'"):
        open_dataset(root)
    refused = _publish(settings, instance)  # the damaged version is never published again
    assert not refused.success and "Not publishing" in " ".join(failures(refused))
    _rematerialize_class(settings, instance, "b")
    assert _publish(settings, instance).success
    assert _samples(root) == good
