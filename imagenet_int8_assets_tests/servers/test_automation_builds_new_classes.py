"""Declarative automation through a real `dagster dev` (webserver + daemon): with
IMAGENET_INT8_AUTOMATION=true and nothing launched by hand, the ``class_folders`` sensor registers
the classes and requests the scan, and ``build_automation`` materializes the whole graph; a class
folder added later goes all the way into the published dataset with no reload. Runs that encode
never overlap (the gpu pool).

Tiny random VAE on CPU; no network, no mocks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from imagenet_int8_assets.build.instance import prepare_dagster_home
from imagenet_int8_assets_tests.support.builds import make_image_folder
from imagenet_int8_assets_tests.support.dagster_dev import (
    ASSET_STATUS_QUERY,
    DagsterDev,
    dagster_dev_env,
    dev_folders,
    run_failures,
    run_summary,
    running_dagster_dev,
    runs_matching,
    use_home,
)

LATENT_BYTES = 4 * 32 * 32
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")



def published_classes(out: Path) -> dict[str, int]:
    """class -> samples of the published dataset (mds/build.json), {} while there is none."""
    try:
        return dict(json.loads((out / "mds" / "build.json").read_text())["per_class"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return {}


def materialized_runs(dev: DagsterDev, names: list[str]) -> dict[str, str | None]:
    """name -> run id of the latest materialization of each unpartitioned asset (None: none)."""
    nodes = {n["assetKey"]["path"][0]: n for n in dev.graphql(ASSET_STATUS_QUERY)["assetNodes"]}
    return {
        name: (nodes[name]["assetMaterializations"][0]["runId"] if nodes[name]["assetMaterializations"] else None)
        for name in names
    }


def all_runs(dev: DagsterDev) -> list[dict]:
    return runs_matching(dev, {})


def fail_with_diagnostics(dev: DagsterDev, message: str) -> None:
    runs = all_runs(dev)
    failed = [r["runId"] for r in runs if r["status"] in ("FAILURE", "CANCELED")]
    summary = [(r["runId"][:8], r["status"], sorted(p["path"][0] for p in r["assetSelection"] or [])) for r in runs]
    pytest.fail(
        f"{message}\nruns: {summary}\n{run_failures(dev, failed)}\n--- dagster dev log ---\n{dev.log_tail()}"
    )


def wait_for(dev: DagsterDev, what: str, ready, deadline: float, poll_s: float = 2.0):
    """Poll ``ready()`` until it returns something truthy (returned); fail with diagnostics when
    dagster dev dies, a run fails, or ``deadline`` (a time.monotonic() value) passes."""
    last = None
    while True:
        if dev.proc.poll() is not None:
            pytest.fail(f"dagster dev exited with code {dev.proc.returncode} waiting for {what}:\n{dev.log_tail()}")
        last = ready()
        if last:
            return last
        failed = [r for r in all_runs(dev) if r["status"] in ("FAILURE", "CANCELED")]
        if failed:
            fail_with_diagnostics(dev, f"a run failed while waiting for {what}")
        if time.monotonic() > deadline:
            fail_with_diagnostics(dev, f"timed out waiting for {what}; published classes {published_classes(dev.out)}")
        time.sleep(poll_s)


def gpu_overlaps(runs: list[dict]) -> tuple[int, list]:
    gpu_runs = sorted(
        (r["startTime"], r["endTime"], r["runId"][:8])
        for r in runs
        if any(p["path"] == ["vae_latents"] for p in r["assetSelection"] or [])
    )
    overlaps = [
        (a[2], b[2]) for a, b in zip(gpu_runs, gpu_runs[1:]) if a[1] is not None and b[0] is not None and b[0] < a[1]
    ]
    return len(gpu_runs), overlaps


def read_dataset(mds: Path) -> tuple[int, list[str]]:
    from imagenet_int8_assets.core.dataset.mds import open_streaming

    import imagenet_int8_assets.reader  # noqa: F401  (registers the 'uint8' latent encoding)

    dataset = open_streaming(local=str(mds), batch_size=1, shuffle=False)
    try:
        labels = []
        for i in range(dataset.num_samples):
            sample = dataset[i]
            assert len(sample["vae_output"]) == LATENT_BYTES, f"sample {i}: {len(sample['vae_output'])} values"
            labels.append(sample["label_as_text"])
        return dataset.num_samples, labels
    finally:
        del dataset


@pytest.mark.timeout(600)
def test_daemon_materializes_a_new_class_end_to_end_without_a_reload(tmp_path: Path, monkeypatch):
    started = time.monotonic()
    out, home, tmp = dev_folders(tmp_path)
    source = make_image_folder(tmp_path / "source", {"a": 2, "b": 2})
    env = dagster_dev_env(
        out, home, tmp,
        IMAGENET_INT8_SOURCE=str(source),
        IMAGENET_INT8_AUTOMATION="true",
        IMAGENET_INT8_SENSOR_INTERVAL="5",
        IMAGENET_INT8_MAX_PARTITIONS_PER_RUN="2",
    )
    use_home(monkeypatch, home, tmp)
    prepare_dagster_home(home)  # shipped dagster.yaml, gpu pool = 1

    with running_dagster_dev(env, tmp_path / "dagster_dev.log", out, home) as dev:
        print(f"\n[auto] served after {time.monotonic() - started:.1f}s")

        # ---- (a) the first two classes, built by the sensors alone --------------------------
        def first_build():
            done = materialized_runs(dev, ["reconstruction_report", "latent_probe"])
            return done if set(published_classes(out)) >= {"a", "b"} and all(done.values()) else None

        first = wait_for(dev, "automation to build classes a and b", first_build, started + 330)
        assert published_classes(out) == {"a": 2, "b": 2}, published_classes(out)
        print(f"[auto] a, b published after {time.monotonic() - started:.1f}s")

        # ---- (b) a new class folder: no reload, no click ----------------------------------
        added = time.monotonic()
        make_image_folder(source, {"c": 2}, size=(260, 280))

        def second_build():
            if published_classes(out).get("c") != 2:
                return None
            done = materialized_runs(dev, ["reconstruction_report", "latent_probe"])
            if not all(done[k] != first[k] for k in done):
                return None
            # The report and the probe are materialized before their run ends (other steps, the
            # run's own end): wait for every run to finish before judging their statuses.
            runs = all_runs(dev)
            return None if any(r["status"] not in FINISHED for r in runs) else runs

        runs = wait_for(dev, "automation to publish class c", second_build, started + 530)
        print(f"[auto] c published {time.monotonic() - added:.1f}s after its folder appeared")
        assert published_classes(out) == {"a": 2, "b": 2, "c": 2}, published_classes(out)

        # ---- who launched the runs ----------------------------------------------------------
        for run in runs:
            print(f"[auto] run {run_summary(run)}")
        assert all(r["status"] == "SUCCESS" for r in runs), [run_summary(r) for r in runs]
        tags = [{t["key"]: t["value"] for t in r["tags"]} for r in runs]
        manual = [run_summary(r) for r, t in zip(runs, tags) if "dagster/sensor_name" not in t and "dagster/backfill" not in t]
        assert not manual, f"runs launched by neither a sensor nor an automation backfill: {manual}"
        manifest_runs = [t for r, t in zip(runs, tags) if [p["path"] for p in r["assetSelection"] or []] == [["raw_manifest"]]]
        assert len(manifest_runs) >= 2, f"expected a raw_manifest scan per new class folder batch: {tags}"
        assert all(t.get("dagster/sensor_name") == "class_folders" for t in manifest_runs), manifest_runs
        encode = [(r, t) for r, t in zip(runs, tags) if any(p["path"] == ["vae_latents"] for p in r["assetSelection"] or [])]
        assert encode, "no run encoded latents"
        # Every encoding run was requested by build_automation. Requests of several classes become
        # backfills (emit_backfills) batched by the multi_run policy: a and b share one run with a
        # backfill id and a partition range. (A lone new class, c, is launched by Dagster as a plain
        # single-partition run of the sensor, with no backfill id.)
        assert all(
            t.get("dagster/sensor_name") == "build_automation" and t.get("dagster/from_automation_condition") == "true"
            for _, t in encode
        ), [run_summary(r) for r, _ in encode]
        batched = [
            t for _, t in encode
            if t.get("dagster/backfill")
            and (t.get("dagster/asset_partition_range_start"), t.get("dagster/asset_partition_range_end")) == ("a", "b")
        ]
        assert batched, f"a and b were not encoded in one batched backfill run: {[run_summary(r) for r, _ in encode]}"
        assert any(t.get("dagster/partition") == "c" or "c" in (
            t.get("dagster/asset_partition_range_start"), t.get("dagster/asset_partition_range_end")) for _, t in encode
        ), f"no encoding run for class c: {[run_summary(r) for r, _ in encode]}"
        # The gpu pool (limit 1) is honoured: runs that encode never overlap.
        count, overlaps = gpu_overlaps(runs)
        print(f"[auto] encoding runs: {count}, overlapping: {overlaps or 'none'}")
        assert not overlaps, f"encoding runs overlapped despite the gpu pool: {overlaps}"

    # ---- the published dataset ----------------------------------------------------------------
    samples, labels = read_dataset(out / "mds")
    assert samples == 6, f"{samples} samples published, expected 6 (3 classes x 2)"
    assert sorted(set(labels)) == ["a", "b", "c"], labels
    assert sorted(labels) == ["a", "a", "b", "b", "c", "c"], labels
    print(f"[auto] whole test {time.monotonic() - started:.1f}s")
